"""``deeppcr.compile`` / ``explain`` / the ``"deeppcr"`` TorchDynamo backend.

``compile(model)`` returns a ``CompiledModule``: lazy, it traces and rewrites on the
first call for each input signature (shapes, dtypes, devices, train/eval flags, grad mode,
keyword inputs by name, Python values by value) and reuses that specialisation afterwards.
It shares the user's Parameters and buffers (no copies, same ``state_dict`` keys) and never
modifies the user's model. It is called as the model is: positional or keyword inputs, and
it returns what the model returns (any pytree, e.g. a transformers ``ModelOutput`` with its
KV cache).

Front ends (``Config.front_end``): ``"auto"`` tries symbolic tracing that inlines every
module (``passes.trace``), then, if the model's own forward cannot be traced, records
one concrete run (``passes.record``: unrolled loops, scheduler Python resolved), then, if
recording meets data-dependent Python (a padding mask's values read), TorchDynamo on the
first call. If none can capture the model, the original model runs and ``report.failure``
says why (``policy="always"``: an error, with ``report`` set). ``"dynamo"`` captures with
TorchDynamo (``fullgraph=True``), the same pass as ``torch.compile(model, backend="deeppcr")``.
``specialise.py`` builds each specialisation; this module owns the per-call dispatch: the
signature, the guards (hooks, Python attributes, ``Config.cache_limit``) and the build lock.
"""
from __future__ import annotations

import logging
import threading
import warnings
from typing import Any, Optional

import torch
import torch.fx as fx

from .config import Config
from .inspect.report import CompileReport
from .inspect.telemetry import ChainStats, collect
from .passes.dynamo import make_backend
from .passes.hooks import hook_epoch, hooked
from .results import CompileError
from .signature import describe, signature, training_sensitive
from .specialise import Builder, Specialisation

logger = logging.getLogger(__name__)

# Building a specialisation traces (torch.fx patches module classes while it does) and the first run
# flattens Parameters into shared buffers: one thread at a time, process-wide. Calls of a built
# specialisation take no lock.
_BUILD_LOCK = threading.RLock()

__all__ = ["CompileError", "CompiledModule", "compile", "dynamo_backend", "explain", "make_backend"]


class CompiledModule(torch.nn.Module):
    """The compiled model: the user's modules and Parameters, run through rewritten graphs."""

    def __init__(self, model: torch.nn.Module, config: Config) -> None:
        super().__init__()
        object.__setattr__(self, "_specialisations", {})
        object.__setattr__(self, "_last", None)
        # the flags a specialisation depends on, found once: scanning model.modules() on every call
        # costs O(depth) Python time, which a 1 ms model run as written (no chain rewritten) would feel
        object.__setattr__(self, "_flag_modules", training_sensitive(model))
        object.__setattr__(self, "_deeppcr_config", config)
        object.__setattr__(self, "_builder", Builder(model, config))
        object.__setattr__(self, "_hooked", hooked(model))  # modules with hooks (the guard in forward)
        object.__setattr__(self, "_hook_epoch", hook_epoch())
        object.__setattr__(self, "_warned_limit", False)
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, p in model.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in model.named_buffers(recurse=False):
            self.register_buffer(name, b, persistent=name not in model._non_persistent_buffers_set)
        self.training = model.training
        # last: from here on, attributes this module lacks are looked up on the model (__getattr__)
        object.__setattr__(self, "_original", model)  # not a submodule: keeps state_dict keys equal

    # --- public surface -----------------------------------------------------------------
    @property
    def original(self) -> torch.nn.Module:
        return self._original

    @property
    def deeppcr_config(self) -> Config:
        """The options this module was compiled with (a name no wrapped model uses)."""
        return self._deeppcr_config

    def __getattr__(self, name: str):
        """Attributes the compiled module does not have come from the original model (``compiled.config``
        is a diffusers UNet's or a transformer's config), so it drops in where the model was used."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            original = self.__dict__.get("_original")
            if original is None:
                raise
            return getattr(original, name)

    @property
    def report(self) -> Optional[CompileReport]:
        """The report of the latest specialisation (``None`` before the first call)."""
        return None if self._last is None else self._last.report

    @property
    def graph_module(self) -> Optional[fx.GraphModule]:
        """The emitted GraphModule of the latest specialisation (``None`` when no front end captured the model).

        When no chain was rewritten the original model runs, and this is the captured graph as analysed.
        """
        return None if self._last is None else self._last.graph_module

    @property
    def specialisations(self) -> int:
        return len(self._specialisations)

    def stats(self) -> "list[ChainStats]":
        """Solver telemetry per rewritten chain, for every input signature compiled so far (oldest first).

        Each ``ChainStats`` holds the ``SolveStats`` of the chain's solves since the last
        ``reset_stats()`` (iterations, residual per iteration, window starts, sequential finishes
        and their cause). Nothing is kept with ``Config.record_stats=False``.
        """
        return [c for spec in self._specialisations.values() for c in collect(spec.graph_module, spec.report)]

    def reset_stats(self) -> None:
        """Forget the recorded solves of every chain."""
        for m in self._solves():
            m.reset_stats()

    def reset_warm_start(self) -> None:
        """Forget every chain's previous solution: each chain's next solve starts cold (from its input)."""
        for m in self._solves():
            m.reset_warm_start()

    def _solves(self) -> list:
        from .runtime.pcr_solve import PCRSolve

        return [m for spec in self._specialisations.values() if spec.graph_module is not None
                for m in spec.graph_module.modules() if isinstance(m, PCRSolve)]

    def train(self, mode: bool = True):
        super().train(mode)
        self._original.train(mode)
        return self

    def forward(self, *args, **kwargs):
        if hook_epoch() != self._hook_epoch:  # a hook was registered somewhere since the last call
            self._check_hooks()
        key = signature(args, self._flag_modules, kwargs)
        spec = self._specialisations.get(key)
        if spec is not None and spec.reads is not None and not spec.reads.holds():
            self._forget(key, spec)  # a Python attribute the capture read has changed: specialise again
            spec = None
        if spec is not None:
            self._note_last(spec)
            return spec.runner(*args, **kwargs)
        with _BUILD_LOCK:  # one build at a time; its first run too (it flattens Parameters, see runtime/stacked.py)
            spec = self._specialisations.get(key)
            if spec is not None:  # another thread built it meanwhile
                self._note_last(spec)
                return spec.runner(*args, **kwargs)
            if len(self._specialisations) >= self.deeppcr_config.cache_limit:
                self._note_last(self._over_limit(args, kwargs))
                return self._original(*args, **kwargs)
            spec = self._build(args, kwargs)
            first, spec.first_output = spec.first_output, None
            self._specialisations[key] = spec
            self._note_last(spec)
            if first is not None:
                return first[1]  # the recording front end ran the model on these very inputs, in this call
            return spec.runner(*args, **kwargs)

    def specialise(self, args: tuple, kwargs: Optional[dict] = None) -> Specialisation:
        """The specialisation for the signature of ``args`` (and ``kwargs``), built now if there is none
        (nothing is run for it)."""
        key = signature(args, self._flag_modules, kwargs)
        with _BUILD_LOCK:
            spec = self._specialisations.get(key)
            if spec is None and len(self._specialisations) >= self.deeppcr_config.cache_limit:
                spec = self._over_limit(args, kwargs)
            elif spec is None:
                spec = self._build(args, kwargs)
                spec.first_output = None  # never handed to a later call: its inputs may have changed
                self._specialisations[key] = spec
        self._note_last(spec)
        return spec

    def _over_limit(self, args: tuple, kwargs: Optional[dict] = None) -> Specialisation:
        """A signature past ``Config.cache_limit``: the original model runs (not kept, so memory stays bounded)."""
        limit = self.deeppcr_config.cache_limit
        note = (f"cache_limit={limit} specialisations reached: inputs {describe(args, kwargs)} run the original model "
                "(raise Config.cache_limit, or call with fewer distinct shapes)")
        if not self._warned_limit:
            object.__setattr__(self, "_warned_limit", True)
            warnings.warn(f"deeppcr: {type(self._original).__name__}: {note}", RuntimeWarning, stacklevel=3)
        report = CompileReport(model=type(self._original).__name__, policy=self.deeppcr_config.policy,
                               signature=describe(args, kwargs), notes=[note])
        return Specialisation(self._original, report, None)

    def _forget(self, key: tuple, spec: Specialisation) -> None:
        logger.info("deeppcr: %s: %s changed since it was compiled: specialising again",
                    type(self._original).__name__, ", ".join(spec.reads.changed()))
        with _BUILD_LOCK:
            if self._specialisations.get(key) is spec:
                del self._specialisations[key]

    def _note_last(self, spec: Specialisation) -> None:
        if spec is not self._last:
            object.__setattr__(self, "_last", spec)

    # --- building -----------------------------------------------------------------------
    def _build(self, args: tuple, kwargs: Optional[dict] = None) -> Specialisation:
        try:
            return self._builder.build(args, kwargs)
        except CompileError:
            if self._builder.failed is not None:  # policy="always" and no front end worked: the report says why
                self._note_last(self._builder.failed)
            raise

    def _check_hooks(self) -> None:
        """Hooks were registered somewhere since the last look (O(1) to notice, see ``passes/hooks.py``):
        if this model's hooked modules changed, forget every specialisation (the next call re-specialises)."""
        with _BUILD_LOCK:
            now = hooked(self._original)
            if now != self._hooked:
                logger.info("deeppcr: hooks of %s changed (%s): specialising again", type(self._original).__name__,
                            ", ".join(sorted(now ^ self._hooked)) or "global hooks")
                self._specialisations.clear()
                object.__setattr__(self, "_last", None)
            object.__setattr__(self, "_hooked", now)
            object.__setattr__(self, "_hook_epoch", hook_epoch())

def _config(config: Optional[Config], options: dict) -> Config:
    options = {k: v for k, v in options.items() if v is not None}
    return (config or Config()).replace(**options)


def compile(model: torch.nn.Module, example_inputs: Optional[tuple] = None, policy: Optional[str] = None,
            jacobian: Optional[str] = None, min_length: Optional[int] = None, config: Optional[Config] = None,
            group: Any = None, **options) -> CompiledModule:
    """Compile ``model``: find its chains and rewrite them into parallel ``PCRSolve`` nodes.

    Lazy: nothing happens until the first call (or now, for ``example_inputs``); each new input
    signature (shapes, dtypes, devices, train/eval flags, grad mode) is specialised once.

    Arguments:
        model: the ``nn.Module`` to compile; it is never modified, and the compiled module shares its
            Parameters and buffers (training the compiled module trains ``model``). A diffusers pipeline
            (``DDPMPipeline``, ``DDIMPipeline``) gives a ``CompiledPipeline`` whose sampling loop is one
            parallel solve (``deeppcr_fx/pipelines.py``).
        example_inputs: inputs to specialise for now instead of on the first call.
        policy: ``"auto"`` (default: rewrite where the cost model predicts a speed-up), ``"always"``
            (every valid chain) or ``"never"`` (trace and report only).
        jacobian, min_length: the ``Config`` fields of these names.
        config: a ``Config``; the keyword options above and ``**options`` override its fields.
        group: a ``torch.distributed`` process group: split the model's longest chain by depth over its
            ranks (``deeppcr_fx/layer_parallel.py``); every rank calls ``compile`` and the result.

    Returns:
        A ``CompiledModule``: call it like ``model``; ``.report`` says what was found, rewritten and
        refused (with reasons), ``.stats()`` how each rewritten chain's solves converged.
    """
    if not isinstance(model, torch.nn.Module) and hasattr(model, "unet") and hasattr(model, "scheduler"):
        from .pipelines import compile_pipeline  # a diffusers pipeline: its sampling loop is compiled

        return compile_pipeline(model, policy=policy, jacobian=jacobian, min_length=min_length, config=config,
                                **options)
    config = _config(config, dict(policy=policy, jacobian=jacobian, min_length=min_length, **options))
    if group is not None:
        from .layer_parallel import LayerParallelModule

        parallel = LayerParallelModule(model, group, config)
        if example_inputs is not None:
            parallel.build(tuple(example_inputs))
        return parallel
    compiled = CompiledModule(model, config)
    if example_inputs is not None:
        compiled.specialise(tuple(example_inputs))
    return compiled


def explain(model: torch.nn.Module, example_inputs: tuple, **options) -> CompileReport:
    """The ``CompileReport`` for ``model`` on ``example_inputs``, with the same options as ``compile``.

    Arguments:
        model: the ``nn.Module`` to analyse (not modified).
        example_inputs: a tuple of the inputs to specialise for.
        **options: ``Config`` fields (``policy``, ``jacobian``, ...), as for ``compile``.

    Returns:
        The ``CompileReport``. The symbolic front end does not run the model; the recording and
        TorchDynamo front ends run it once.
    """
    compiled = compile(model, **options)
    spec = compiled.specialise(tuple(example_inputs))
    if spec.graph_module is None and spec.report.front_end is None and spec.report.failure is None:
        spec.runner(*example_inputs)  # TorchDynamo captures on the first call
    return spec.report


def dynamo_backend(gm: fx.GraphModule, example_inputs, options: Optional[dict] = None):
    """``torch.compile(model, backend="deeppcr", options={...})``: ``options`` are ``Config`` fields."""
    backend = make_backend(**(options or {}))
    out = backend(gm, example_inputs)
    out.meta["deeppcr_report"] = backend.reports[-1]
    return out
