"""The pass pipeline: torch.fx's ``PassManager`` over an explicit, ordered list of passes.

Each pass is a ``torch.fx.passes.infra.PassBase`` (``requires -> call -> ensures``) built
from the frozen ``CompileOptions``; it returns a ``PassResult(graph_module, modified)``. What
a pass learns is written on the graph, not into a shared context: node shapes in
``node.meta``, the chains' ``ChainPlan``s in ``gm.meta[PLANS]`` (``passes/plan.py``). A pass
that modified the graph lints it (the front ends lint what they capture; a pass that only
analyses cannot break it, and a lint of a 200,000-node graph takes a second); a failing pass is
re-raised as ``PassError`` naming the passes that already ran.

    shape_prop    node.meta["pcr"] and gm.meta[SHAPES]          (passes/shape_prop.py)
    find_chains   gm.meta[PLANS]: one ChainPlan per candidate   (passes/find_chains.py)
    validate      plan.template, plan.refusal, plan.mode        (passes/validate.py)
    decide        plan.prediction, plan.refusal, plan.decision  (passes/decide.py)
    describe      plan.record: the report's ChainRecord         (passes/records.py)
    rewrite       PCRSolve submodules; plan.submodule           (passes/rewrite.py, passes/naming.py)

``run_pipeline`` runs them, puts the records into the ``CompileReport``, and with
``Config.autotune`` times the chains' variants (``passes/autotune.py``). The report keeps
the graph after each pass (``CompileReport.graphs``): the captured graph, a copy after each
pass that modified it, and the emitted graph last. Graphs are formatted only when DEBUG
logging is on.
"""
from __future__ import annotations

import copy
import logging

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.fx.passes.infra.pass_manager import PassManager

from ..inspect.report import CompileReport
from ..results import REWRITTEN, PassError
from .autotune import autotune
from .decide import decide
from .empty import explain_empty
from .find_chains import find_chains
from .naming import free_name, tidy_names
from .options import CompileOptions
from .plan import PLANS, SHAPES, ChainPlan, plans_of
from .records import chain_record
from .rewrite import rewrite
from .shape_prop import info_of, propagate
from .trace_memo import append_node
from .validate import validate

try:  # recompiles only when the code is needed: the manager recompiles after every pass
    from torch.fx._lazy_graph_module import _LazyGraphModule as _GraphModule
except ImportError:  # pragma: no cover - older torch: every recompile is real (slower, same result)
    _GraphModule = fx.GraphModule

logger = logging.getLogger(__name__)


class _Pass(PassBase):
    """A deeppcr pass: its options, a name for the report's graph history, and checks of its inputs."""

    name = ""

    def __init__(self, options: CompileOptions, history: dict) -> None:
        self.options, self.history = options, history

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        result = super().__call__(gm)
        previous = self.history[list(self.history)[-1]]
        if result.modified:  # only a pass that changed the graph can have broken it: lint once, here
            result.graph_module.graph.lint()
            logger.debug("deeppcr: graph after %s:\n%s", self.name, _GraphText(result.graph_module))
        # the last pass's graph is the emitted graph itself (``_run_passes``): no copy of it
        last = self.name == PASSES[-1].name
        self.history[self.name] = _snapshot(result.graph_module, self.name) if result.modified and not last \
            else previous
        return result

    def _plans(self, gm: fx.GraphModule, after: str, done: str) -> list:
        if PLANS not in gm.meta:
            raise PassError(f"deeppcr pass {self.name} needs the chain plans of find_chains")
        plans = plans_of(gm)
        if not all(getattr(p, done) for p in plans):
            raise PassError(f"deeppcr pass {self.name} needs every chain to be {after} first")
        return plans


class ShapeProp(_Pass):
    name = "shape_prop"

    def call(self, gm: fx.GraphModule) -> PassResult:
        gm.meta[SHAPES] = propagate(gm, self.options.example_inputs)
        return PassResult(gm, False)


class FindChains(_Pass):
    name = "find_chains"

    def requires(self, gm: fx.GraphModule) -> None:
        if SHAPES not in gm.meta:
            raise PassError("deeppcr pass find_chains needs shape_prop's node shapes")

    def call(self, gm: fx.GraphModule) -> PassResult:
        sources = self.options.sources
        if sources is not None:
            sources = [s for s in sources if info_of(s) is not None and info_of(s).is_tensor
                       and info_of(s).dtype.is_floating_point]
        gm.meta[PLANS] = [ChainPlan(c) for c in find_chains(gm, sources)]
        return PassResult(gm, False)


class Validate(_Pass):
    name = "validate"

    def requires(self, gm: fx.GraphModule) -> None:
        self._plans(gm, "found", "candidate")

    def call(self, gm: fx.GraphModule) -> PassResult:
        for plan in plans_of(gm):
            validate(plan, gm, gm.meta[SHAPES], self.options.config)
        return PassResult(gm, False)


class Decide(_Pass):
    name = "decide"

    def requires(self, gm: fx.GraphModule) -> None:
        self._plans(gm, "validated", "validated")

    def call(self, gm: fx.GraphModule) -> PassResult:
        decide(plans_of(gm), gm, self.options)
        return PassResult(gm, False)


class Describe(_Pass):
    name = "describe"

    def requires(self, gm: fx.GraphModule) -> None:
        self._plans(gm, "decided", "decided")

    def call(self, gm: fx.GraphModule) -> PassResult:
        for i, plan in enumerate(plans_of(gm)):
            plan.record = chain_record(i, plan, gm, self.options)
        return PassResult(gm, False)


class Rewrite(_Pass):
    name = "rewrite"

    def requires(self, gm: fx.GraphModule) -> None:
        self._plans(gm, "described", "record")

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified, replaced = False, {}
        for plan in plans_of(gm):
            start = plan.candidate.segments[0].state_in.name
            if not plan.accepted:
                logger.debug("deeppcr: chain at %s refused: %s", start, plan.refusal)
                continue
            name = free_name(gm, "pcr_solve")
            rewrite(gm, plan, self.options.config, name, replaced)
            tidy_names(gm, name, replaced)
            plan.submodule = plan.record.submodule = name
            modified = True
            logger.debug("deeppcr: chain %s (L=%d, p=%d) -> %s", start, plan.candidate.length,
                         plan.candidate.period, name)
        return PassResult(gm, modified)

    def ensures(self, gm: fx.GraphModule) -> None:
        missing = [p.record.index for p in plans_of(gm) if p.accepted and p.submodule is None]
        if missing:
            raise PassError(f"deeppcr pass rewrite left accepted chains {missing} sequential")


PASSES = (ShapeProp, FindChains, Validate, Decide, Describe, Rewrite)


def _snapshot(gm: fx.GraphModule, name: str) -> fx.GraphModule:
    """A copy of ``gm``'s graph (sharing its Parameters and submodules) that later passes cannot change."""
    return _sharing(gm, _copy(gm.graph), name)


def _copy(graph: fx.Graph) -> fx.Graph:
    """``copy.deepcopy(graph)`` (same nodes, names, metadata and code generator), each node appended as
    ``trace_memo.append_node`` does: the nodes' arguments are those of a graph already."""
    new, env = fx.Graph(tracer_cls=graph._tracer_cls), {}
    for n in graph.nodes:
        if n.op == "output":
            out = new.output(fx.node.map_arg(n.args[0], env.__getitem__), type_expr=n.type)
            out.meta = copy.copy(n.meta)
            break
        env[n] = append_node(new, n.op, n.target, fx.node.map_arg(n.args, env.__getitem__),
                             fx.node.map_arg(n.kwargs, env.__getitem__), n.name, n.type)
        env[n].meta = copy.copy(n.meta)
    new._codegen = copy.deepcopy(graph._codegen)
    return new


def _sharing(gm: fx.GraphModule, graph: fx.Graph, class_name: str) -> fx.GraphModule:
    """A GraphModule running ``graph`` with ``gm``'s own submodules, Parameters, buffers and tensor
    attributes. (``GraphModule(gm, graph)`` would build new intermediate modules for every
    ``get_attr`` path: thousands of ``nn.Module`` objects for a deep chain, and a copy that no
    longer reads the user's modules.)"""
    new = _GraphModule(torch.nn.Module(), fx.Graph(), class_name=class_name)
    new._modules.update(gm._modules)
    new._parameters.update(gm._parameters)
    new._buffers.update(gm._buffers)
    for node in graph.nodes:  # root attributes the graph reads: tensor constants, recorded generators
        if node.op == "get_attr" and "." not in node.target and not hasattr(new, node.target):
            object.__setattr__(new, node.target, getattr(gm, node.target))
    new.graph = graph
    return new


def run_pipeline(gm: fx.GraphModule, options: CompileOptions, report: CompileReport) -> PassResult:
    """Run the passes over ``gm`` and fill ``report``'s chains and graphs.

    Arguments:
        gm: the captured graph (it is wrapped, not copied: the rewrite changes its graph).
        options: the options and example inputs of this compilation.
        report: the report to fill (``chains``, ``graphs`` and, with autotuning, ``notes``).

    Returns:
        ``PassResult(graph_module, modified)``: the emitted graph, and whether some chain of it
        was rewritten (the caller then runs the graph, else the original model).
    """
    gm = _sharing(gm, gm.graph, type(gm).__name__)  # lazy recompiles, the same (the model's own) modules
    options = options.with_backward(gm)
    capture = _snapshot(gm, "capture")
    result = _run_passes(gm, options, report, capture)
    if not options.config.autotune:
        return result

    def build(forced: dict) -> "tuple[PassResult, CompileReport]":
        again = CompileReport(model=report.model, policy=report.policy, signature=report.signature,
                              front_end=report.front_end)
        built = _run_passes(_snapshot(capture, type(gm).__name__), options.replace(forced=forced), again, capture)
        return built, again

    chosen, chosen_report = autotune(result, report, options, capture, build)
    if chosen_report is not report:
        report.chains, report.graphs = chosen_report.chains, chosen_report.graphs
        report.notes.extend(n for n in chosen_report.notes if n not in report.notes)
    return chosen


def _run_passes(gm: fx.GraphModule, options: CompileOptions, report: CompileReport,
                capture: fx.GraphModule) -> PassResult:
    history = {"capture": capture}
    logger.debug("deeppcr: captured graph (%s):\n%s", options.front_end, _GraphText(gm))
    manager = PassManager([p(options, history) for p in PASSES])  # each pass lints what it changed
    try:
        gm = manager(gm).graph_module
    except Exception as exc:  # PassManager wraps every failure in a bare Exception naming the passes
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        if isinstance(cause, PassError):
            raise cause
        raise PassError(f"deeppcr: {exc}: {type(cause).__name__}: {cause}") from cause
    history[list(history)[-1]] = gm  # the emitted graph itself
    report.graphs = history
    report.chains.extend(p.record for p in plans_of(gm))
    if not plans_of(gm):  # every report explains an empty result
        report.notes.extend(n for n in explain_empty(gm, options.sources) if n not in report.notes)
    return PassResult(gm, any(c.status == REWRITTEN for c in report.chains if c.graph == options.graph_index))


class _GraphText:
    """Formats a graph as readable Python only when a log record is emitted (DEBUG)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm

    def __str__(self) -> str:
        return self.gm.print_readable(print_output=False)
