"""Evaluate a user's step function on many steps at once, in the solver's flat layout.

``Steps`` wraps ``step(z, *per_step_slices, *shared)`` and offers the batched calls the
Newton driver and the adjoint need, all on flat states ``(rows, B, n)``:

- ``batched(lo, hi)``: a function ``Zprev -> Znext`` for steps ``lo..hi-1`` in one call:
  ``torch.func.vmap`` over the stacked per-step inputs, or a per-step loop when vmap
  cannot handle an op (``vectorize="auto"``; the reason is kept in ``vmap_error``).
- ``single(l, z)``: step ``l`` alone, for sequential finishes.

Per-step and shared tensors are closed over, so ``torch.func`` transforms of these
functions differentiate with respect to the state only; the backward pass gets parameter
gradients through ``batched_with_params``.

A ``torch.fx.GraphModule`` step (a compiled chain's step template) is called through
``direct_call``, so an exception the solver handles (vmap cannot batch an op, the step refuses
a replicated batch) prints nothing: see ``direct_call``.
"""
from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Callable, Sequence

import torch
import torch.fx as fx
import torch.nn.modules.module as nn_module
from torch.func import vmap

from ..results import VectorizeError
from .state import StateSpec

logger = logging.getLogger(__name__)

# What torch.func.vmap raises when it cannot batch a step (torch/_functorch: RuntimeError for
# data-dependent control flow, .item(), unsupported in-place ops and missing batching rules,
# ValueError for outputs or inputs it cannot map, NotImplementedError for unsupported features).
VMAP_ERRORS = (RuntimeError, ValueError, NotImplementedError)
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def direct_call(step: Callable) -> Callable:
    """``step``, or for a hook-free ``torch.fx.GraphModule`` its generated ``forward``.

    ``GraphModule.__call__`` catches any exception raised in its generated code, prints the
    traceback and the lines of that code around the fault to stderr, and re-raises it without its
    traceback (``torch/fx/graph_module.py``, ``_WrappedCall``). The solver handles some
    exceptions on purpose (vmap cannot batch the step; the step refuses a replicated batch)
    and records why in ``SolveStats``, so the print is noise. For a module without hooks
    ``nn.Module.__call__`` does nothing but call ``forward``, so calling ``forward`` directly is
    the same computation without the print (and the exception keeps its traceback). A
    GraphModule with hooks (its own or global ones), under ``torch.jit`` tracing, or compiled
    with ``Module.compile()`` is returned as it is. A lazily recompiled GraphModule is
    recompiled here first (its first ``forward`` would otherwise go through ``__call__``).
    """
    if not isinstance(step, fx.GraphModule) or torch._C._get_tracing_state() is not None \
            or getattr(step, "_compiled_call_impl", None) is not None:
        return step
    if step._forward_hooks or step._forward_pre_hooks or step._backward_hooks or step._backward_pre_hooks \
            or any(getattr(nn_module, name, None) for name in _GLOBAL_HOOKS):
        return step
    if getattr(type(step), "_needs_recompile", lambda: False)():  # torch.fx._lazy_graph_module
        step.real_recompile()
    return step.forward


class Steps:
    def __init__(self, step: Callable, spec: StateSpec, per_step: Sequence[torch.Tensor],
                 shared: Sequence, vectorize: object) -> None:
        self.step = step
        self.spec = spec
        self.per_step = tuple(per_step)
        self.shared = tuple(shared)
        self.vectorize = vectorize
        self.vmap_error: str | None = None  # why the per-step loop is used, if it is
        # an op vmap itself evaluated per sample (no batching rule, e.g. CPU scaled_dot_product_attention):
        # batched in name only; found from torch's warning on the first batched call
        self.vmap_fallback: str | None = None
        self._fallback_checked = False

    @property
    def inputs(self) -> tuple:
        """Per-step then shared inputs, in the order ``batched_with_params`` takes them."""
        return self.per_step + self.shared

    @property
    def vectorized(self) -> bool:
        return self.vectorize is not False and self.vmap_error is None

    def record(self, stats) -> None:
        """Write whether these steps ran vectorised, and why not, into ``stats`` (a ``SolveStats``):
        called after the forward pass and again after the backward pass (its steps can fall back
        on their own); the first reason recorded is kept."""
        stats.vectorized = stats.vectorized and self.vectorized and self.vmap_fallback is None
        if stats.vmap_error is None:
            stats.vmap_error = self.vmap_error or self.vmap_fallback

    def sample_dims(self) -> tuple:
        """Each input's per-sample dimension as one step sees it (``jacobians.replicates``): dim 1 of a
        per-step tensor (dim 0 of its slice), dim 0 of a shared tensor; None where there is none."""
        return tuple(p.shape[1] if p.dim() >= 2 else None for p in self.per_step) \
            + tuple(s.shape[0] if s.dim() >= 1 else None for s in self.shared)

    # one step ---------------------------------------------------------------------------
    def single(self, l: int, z_flat: torch.Tensor, per_step: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        ps = self.per_step if per_step is None else per_step
        out = self.step(self.spec.unflatten(z_flat), *(p[l] for p in ps), *self.shared)
        return self.spec.flatten(out)

    # many steps -------------------------------------------------------------------------
    def batched_with_params(self, lo: int, hi: int) -> Callable:
        """``(Zprev, *per_step_slices, *shared) -> Znext`` for steps lo..hi-1 (for the backward VJP)."""
        spec, step, n_ps = self.spec, self.step, len(self.per_step)

        def one(z, *args):
            return spec.flatten(step(spec.unflatten(z), *args))

        in_dims = (0,) + (0,) * n_ps + (None,) * len(self.shared)
        looped = self._loop(one, n_ps)
        if not self.vectorized:
            return looped
        mapped = vmap(one, in_dims=in_dims)
        return self._with_fallback(mapped, looped)

    def replicated(self, copies: int) -> "Steps | None":
        """These steps on a batch of ``copies * B`` samples (for ``jacobians.jacobian_replicated``);
        None when the state has no batch dimension to grow. Whether to use them is
        ``jacobians.replicates``'s decision (the caller's)."""
        if not self.spec.batch:
            return None
        spec = dataclasses.replace(self.spec, shapes=tuple((copies * s[0], *s[1:]) for s in self.spec.shapes))
        return Steps(self.step, spec, self.per_step, self.shared, True if self.vectorized else False)

    def batched(self, lo: int, hi: int) -> Callable:
        """``Zprev -> Znext`` for steps lo..hi-1, with per-step and shared inputs closed over."""
        f = self.batched_with_params(lo, hi)
        per_step = tuple(p[lo:hi] for p in self.per_step)
        shared = self.shared
        return lambda Z: f(Z, *per_step, *shared)

    @staticmethod
    def _loop(one: Callable, n_ps: int) -> Callable:
        def looped(Z, *args):
            ps, sh = args[:n_ps], args[n_ps:]
            return torch.stack([one(Z[i], *(p[i] for p in ps), *sh) for i in range(Z.shape[0])])

        return looped

    def _checked(self, mapped: Callable, args: tuple):
        """The first batched call, watching for torch's "no batching rule" warning (vmap then loops over
        the samples itself); other warnings are passed on."""
        self._fallback_checked = True
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = mapped(*args)
        for w in caught:
            text = str(w.message)
            if "batching rule for" in text:
                if self.vmap_fallback is None:
                    op = text.split("batching rule for ", 1)[1].split(".", 1)[0]
                    self.vmap_fallback = f"vmap evaluated {op} per sample (it has no batching rule)"
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return out

    def _with_fallback(self, mapped: Callable, looped: Callable) -> Callable:
        def call(*args):
            if self.vmap_error is None:
                try:
                    if not self._fallback_checked:
                        return self._checked(mapped, args)
                    return mapped(*args)
                except VMAP_ERRORS as exc:  # vmap could not batch an op in the user's step
                    if self.vectorize is True:
                        raise VectorizeError(
                            "Config(vectorize=True) but torch.func.vmap cannot batch this step: "
                            f"{type(exc).__name__}: {exc}. Use vectorize='auto' to fall back to a per-step loop."
                        ) from exc
                    self.vmap_error = f"{type(exc).__name__}: {exc}"
                    logger.warning("deeppcr: vmap cannot batch the step (%s); evaluating steps in a loop",
                                   self.vmap_error)
            return looped(*args)

        return call
