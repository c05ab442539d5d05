"""Building one specialisation: capture the model with a front end, run the pass pipeline, pick the runner.

``Builder(model, config).build(args, kwargs)`` tries the front ends in ``Config.front_end``'s
order (``"auto"``: symbolic tracing, then one recorded run, then TorchDynamo on the first call;
or one of them), prepares what was captured (shape-only reads as constants,
``passes/shape_reads.py``; values the steps hand to the caller recomputed after the chain,
``passes/escapes.py``), runs ``passes.pipeline`` on it, and returns a ``Specialisation``: what to
call for inputs of this signature (the rewritten graph behind a ``GraphCall`` that picks its
tensors from the call's arguments and rebuilds the model's output, or the model itself when
nothing was rewritten, when the model has hooks of its own or its forward has Python side
effects), its report and its emitted graph.
"""
from __future__ import annotations

import contextlib
import gc
import logging
from typing import Any, Optional

import torch
import torch.fx as fx

from .config import Config
from .inspect.report import CompileReport
from .passes.dynamo import DynamoBackend
from .passes.hooks import describe_hooks, has_hooks, hooked
from .passes.options import CompileOptions
from .passes.pipeline import run_pipeline
from .passes.reads import AttributeGuard, recording_reads
from .passes.escapes import recompute_escapes
from .passes.pytrees import Inputs, Outputs
from .passes.record import INPUTS, OUTPUT_SPEC, record
from .passes.shape_prop import propagate
from .passes.shape_reads import constant_shape_reads, has_shape_reads, home_device
from .passes.trace import trace
from .results import CompileError, Reason, RecordFailure, TraceFailure
from .signature import autocast_on, describe

logger = logging.getLogger(__name__)


class GraphCall:
    """Calls a recorded graph as the model is called: picks the graph's tensor inputs from the call's
    arguments (``Inputs``) and rebuilds the model's output from the tensors it returns (``Outputs``)."""

    def __init__(self, gm: fx.GraphModule, inputs: Inputs, outputs: Optional[Outputs]) -> None:
        self.gm, self.inputs, self.outputs = gm, inputs, outputs

    def __call__(self, *args, **kwargs):
        out = self.gm(*self.inputs.tensors(args, kwargs))
        return out if self.outputs is None else self.outputs.rebuild(out)


class Specialisation:
    def __init__(self, runner: Any, report: CompileReport, graph_module: Optional[fx.GraphModule],
                 first_output: Any = None, reads: Optional[AttributeGuard] = None) -> None:
        self.runner, self.report, self.graph_module = runner, report, graph_module
        self.first_output = first_output  # (inputs, output) when the recording front end just ran the model
        self.reads = reads if reads else None  # the Python attributes its capture read (None: none read)


@contextlib.contextmanager
def _collector_paused():
    """Python's cyclic garbage collector off while a specialisation is built, on again after (if it was on).

    A build makes millions of long-lived objects (fx nodes, their arguments, names and metadata), and
    the collections their allocations trigger walk them again and again: a quarter of the time of
    compiling a 50,000-layer chain went to the collector. Nodes are freed by reference counting; the
    cycles a build leaves (erased nodes) wait for the first collection after it.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:  # another thread's build may have turned it off meanwhile: it turns it on when done
            gc.enable()


class Builder:
    """Builds the specialisations of one model under one ``Config``."""

    def __init__(self, model: torch.nn.Module, config: Config) -> None:
        self.model, self.config = model, config
        self.failed: Optional[Specialisation] = None  # the latest build that raised CompileError (its report)

    def build(self, args: tuple, kwargs: Optional[dict] = None) -> Specialisation:
        with _collector_paused():
            return self._build(args, kwargs)

    def _build(self, args: tuple, kwargs: Optional[dict] = None) -> Specialisation:
        model, config, kwargs = self.model, self.config, dict(kwargs or {})
        new_report = lambda: CompileReport(model=type(model).__name__, policy=config.policy,  # noqa: E731
                                           signature=describe(args, kwargs))
        errors: list = []
        symbolic = None
        if config.front_end in ("auto", "symbolic"):
            try:
                symbolic = self.symbolic(args, kwargs, new_report())
            except TraceFailure as exc:
                errors.append(f"symbolic tracing: {exc}")
            else:
                opaque_refusals = [c for c in symbolic.report.refused if c.reason is Reason.OPAQUE_MODULE]
                if config.front_end == "symbolic" or not opaque_refusals:
                    return symbolic
        if config.front_end == "dynamo":
            return self._dynamo(new_report())
        if config.front_end in ("auto", "record"):
            try:
                recorded = self._record(args, kwargs, new_report())
            except RecordFailure as exc:
                errors.append(f"recording: {exc}")
            else:
                if symbolic is not None:  # symbolic tracing kept modules opaque inside chains: compare
                    if len(recorded.report.rewritten) <= len(symbolic.report.rewritten):
                        recorded.first_output = None
                        return symbolic
                    recorded.report.notes.append("symbolic tracing kept modules opaque inside chains; "
                                                 "the recorded run inlines them")
                elif errors:
                    recorded.report.notes.append(f"{errors[0]}; recorded a concrete run instead")
                return recorded
        if symbolic is not None:
            return symbolic
        if config.front_end == "auto":  # neither captured the model: TorchDynamo may (it runs on the first call)
            return self._dynamo(new_report(), errors)
        return self._fail(new_report(), Reason.TRACE_FAILED, "; ".join(errors))

    def symbolic(self, args: tuple, kwargs: dict, report: CompileReport) -> Specialisation:
        """The symbolic front end: trace (reads recorded), prepare, run the passes; never falls back."""
        with recording_reads(AttributeGuard(), self.model) as reads:
            try:
                traced = trace(self.model, args, kwargs)
            finally:
                reads.undo_writes()  # tracing is not a call: its Python side effects are undone
        report.front_end, report.captured, report.opaque_modules = "symbolic", 1, traced.opaque
        tensors = args if traced.inputs is None else tuple(traced.inputs.tensors(args, kwargs))
        if has_shape_reads(traced.graph_module):  # zeros_like(h), device=h.device: constants of this signature
            propagate(traced.graph_module, tensors)
            constant_shape_reads(traced.graph_module, home_device(tensors))
        report.notes.extend(recompute_escapes(traced.graph_module, tensors))  # per-layer values for the caller
        options = CompileOptions(self.config, tensors, front_end="symbolic", autocast=autocast_on())
        result = run_pipeline(traced.graph_module, options, report)
        runner = self._runner(result, report, reads)
        plain = not kwargs and (traced.inputs is None or traced.inputs == Inputs(tuple(range(len(args))), ()))
        if runner is result.graph_module and not plain:
            runner = GraphCall(result.graph_module, traced.inputs, None)
        return Specialisation(runner, report, result.graph_module, reads=reads.freeze())

    def _record(self, args: tuple, kwargs: dict, report: CompileReport) -> Specialisation:
        with recording_reads(AttributeGuard(), self.model) as reads:
            gm, out = record(self.model, args, kwargs)
        inputs = gm.meta[INPUTS]
        report.front_end, report.captured = "record", 1
        report.notes.append("recorded one concrete run: Python-side state changes (e.g. a scheduler's counters) "
                            "happen when the original model runs, not in the rewritten graph")
        tensors = tuple(inputs.tensors(args, kwargs))
        report.notes.extend(recompute_escapes(gm, tensors))
        options = CompileOptions(self.config, tensors, front_end="record", autocast=autocast_on())
        result = run_pipeline(gm, options, report)
        runner = self._runner(result, report, reads)
        if runner is result.graph_module:
            runner = GraphCall(result.graph_module, inputs, gm.meta.get(OUTPUT_SPEC))
        return Specialisation(runner, report, result.graph_module, first_output=(args, out),
                               reads=reads.freeze())

    def _dynamo(self, report: CompileReport, errors: tuple = ()) -> Specialisation:
        """TorchDynamo: one graph (``front_end="dynamo"``), or, as the fallback after ``errors`` (data-dependent
        Python), the regions between graph breaks, with the Python between them guarded and run as written."""
        backend = DynamoBackend(self.config, model_name=type(self.model).__name__, model=self.model)
        fullgraph = not errors
        compiled = torch.compile(self.model, backend=backend, fullgraph=fullgraph, dynamic=False)
        fallback = "captured with TorchDynamo instead" + ("" if fullgraph else ", which splits forward at graph "
                                                          "breaks and guards the Python between them (chains cannot "
                                                          "cross a break)")

        def runner(*a, **kw):
            try:
                out = compiled(*a, **kw)
            except Exception as exc:
                if spec.graph_module is not None:  # it captured before: a genuine error of the model
                    raise
                detail = "; ".join([*errors, f"TorchDynamo could not capture the model: "
                                    f"{type(exc).__name__}: " + (str(exc).splitlines()[0] if str(exc) else "")])
                spec.runner = self._fail(report, Reason.TRACE_FAILED, detail).runner
                return spec.runner(*a, **kw)
            if backend.reports:
                latest = backend.reports[-1]
                report.front_end, report.captured = "dynamo", len(backend.graph_modules)
                report.graphs = latest.graphs
                report.chains = [c for r in backend.reports for c in r.chains]  # every graph (breaks)
                report.notes = report.notes + [n for n in latest.notes if n not in report.notes]
                report.notes.extend(f"{e}; {fallback}" for e in errors if f"{e}; {fallback}" not in report.notes)
                spec.graph_module = backend.graph_modules[-1]
            return out

        spec = Specialisation(runner, report, None)
        return spec

    def _runner(self, result, report: CompileReport, reads: Optional[AttributeGuard] = None) -> Any:
        """The rewritten graph, or the original model when no chain was rewritten (nothing to gain,
        and the model's own Python, e.g. a scheduler's counters, keeps running as written), when
        the model itself has hooks (the graph would not call them) or its forward sets module
        attributes (Python side effects the graph would not repeat)."""
        if result.modified and reads is not None and reads.writes:
            report.notes.append(f"forward sets {', '.join(reads.writes[:5])}: Python side effects the rewritten "
                                "graph would not repeat, so the model runs as written (chains stay sequential)")
            return self.model
        if result.modified and has_hooks(self.model):
            report.notes.append(f"the model itself has {describe_hooks(self.model)}: it runs as written, "
                                "so they fire (the chains stay sequential)")
            return self.model
        if result.modified and report.front_end == "record" and hooked(self.model):
            report.notes.append("modules with hooks and a recorded graph (which calls no module): the model "
                                "runs as written, so the hooks fire (the chains stay sequential)")
            return self.model
        return result.graph_module if result.modified else self.model

    def _fail(self, report: CompileReport, reason: Reason, detail: str) -> Specialisation:
        report.failure, report.failure_detail = reason, detail
        self.failed = Specialisation(self.model, report, None)
        if self.config.policy == "always":
            raise CompileError(f"deeppcr.compile(policy='always'): {type(self.model).__name__} cannot be "
                               f"compiled: {detail}. {reason.remedy}")
        logger.info("deeppcr: %s runs unchanged: %s", type(self.model).__name__, detail)
        return Specialisation(self.model, report, None)
