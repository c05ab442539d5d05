"""The pass pipeline: an explicit ordered list of passes over one captured graph.

Each pass is ``pass_(gm, ctx) -> PassResult(graph_module, modified)``; ``ctx`` carries
the options, the example inputs and what earlier passes learned (shapes, candidates,
decisions, cost predictions), and collects the ``CompileReport``'s chain records. A failing
pass is re-raised as ``PassError`` naming the passes that already ran.

Passes: shape propagation, finding chains, validation (typed refusals), ``decide`` (the
policy: ``"never"`` refuses, ``"auto"`` asks the cost model, ``Context.forced`` carries
autotuning's measured choices), rewriting, recompiling.

The report keeps the graph after each pass (``CompileReport.graphs``): a copy of the
captured graph, a copy after each pass that modified it, and the emitted graph last.
Graphs are formatted only when DEBUG logging is on (``_GraphText``).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import operator
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.fx as fx

from ..config import Config
from ..inspect.report import ChainRecord, CompileReport, InputRecord
from ..results import COEFFICIENT, PER_STEP, REFUSED, REWRITTEN, SHARED
from ..runtime import jacobians
from .autotune import autotune
from .calibrate import constants_for
from .cost_model import MARGIN, Prediction, predict
from .find_chains import Candidate, find_chains
from ..runtime.stacked import StackedAttributes
from .rewrite import covered_modules, rewrite, slots_of
from .shape_prop import ShapeInfo, info_of, propagate
from .step_profile import profile
from ..results import PassError, Reason, Refusal
from .validate import validate

logger = logging.getLogger(__name__)


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool


@dataclass
class Context:
    config: Config
    example_inputs: tuple
    report: CompileReport
    front_end: str = "symbolic"
    graph_index: int = 0
    sources: Optional[list] = None  # placeholders a chain may start from (None: every float tensor input)
    shapes: Optional[ShapeInfo] = None
    candidates: list = field(default_factory=list)
    decisions: list = field(default_factory=list)  # (Candidate, Optional[Refusal]) per candidate
    predictions: dict = field(default_factory=dict)  # candidate index -> cost_model.Prediction
    # candidate index -> (parallel: bool, why): choices measured by autotuning, applied by ``decide``
    forced: dict = field(default_factory=dict)
    backward: bool = False  # whether a backward pass is expected (grad mode on, something requires grad)

    @property
    def device_type(self) -> str:
        devices = [x.device.type for x in self.example_inputs if isinstance(x, torch.Tensor)]
        return "cuda" if "cuda" in devices else (devices[0] if devices else "cpu")

    @property
    def device_index(self) -> Optional[int]:
        for x in self.example_inputs:
            if isinstance(x, torch.Tensor) and x.device.type == self.device_type:
                return x.device.index
        return None


def shape_prop_pass(gm: fx.GraphModule, ctx: Context) -> PassResult:
    ctx.shapes = propagate(gm, ctx.example_inputs)
    return PassResult(gm, False)


def find_chains_pass(gm: fx.GraphModule, ctx: Context) -> PassResult:
    sources = None if ctx.sources is None else [s for s in ctx.sources
                                                if info_of(s) is not None and info_of(s).is_tensor
                                                and info_of(s).dtype.is_floating_point]
    ctx.candidates = find_chains(gm, sources)
    return PassResult(gm, False)


def validate_pass(gm: fx.GraphModule, ctx: Context) -> PassResult:
    ctx.decisions = [(c, validate(c, gm, ctx.shapes, ctx.config)) for c in ctx.candidates]
    return PassResult(gm, False)


def _expects_backward(gm: fx.GraphModule, ctx: Context) -> bool:
    if not torch.is_grad_enabled():
        return False
    tensors = [x for x in ctx.example_inputs if isinstance(x, torch.Tensor)]
    return any(t.requires_grad for t in tensors) or any(p.requires_grad for p in gm.parameters())


def decide_pass(gm: fx.GraphModule, ctx: Context) -> PassResult:
    """The policy: predict every valid chain's cost; "never" refuses, "auto" refuses unprofitable chains;
    choices in ``ctx.forced`` (autotuning's measurements) override the prediction."""
    ctx.backward = _expects_backward(gm, ctx)
    constants = None
    decisions = []
    for i, (c, refusal) in enumerate(ctx.decisions):
        if refusal is None or refusal.reason is Reason.TOO_SHORT:  # too short: the report still shows the estimate
            shape = profile(c, gm, ctx.config, ctx.device_type, ctx.backward)
            if shape is not None:
                constants = constants or constants_for(ctx.device_type, ctx.device_index)
                ctx.predictions[i] = predict(shape, constants)
        if refusal is None:
            refusal = _policy(i, ctx)
        decisions.append((c, refusal))
    ctx.decisions = decisions
    return PassResult(gm, False)


def _policy(i: int, ctx: Context) -> Optional[Refusal]:
    if ctx.config.policy == "never":
        return Refusal(Reason.POLICY_NEVER)
    if i in ctx.forced:
        parallel, why = ctx.forced[i]
        return None if parallel else Refusal(Reason.NOT_PROFITABLE, why)
    prediction = ctx.predictions.get(i)
    if ctx.config.policy == "auto" and (prediction is None or not prediction.profitable()):
        return Refusal(Reason.NOT_PROFITABLE, prediction.describe() if prediction else "no cost estimate")
    return None


def rewrite_pass(gm: fx.GraphModule, ctx: Context) -> PassResult:
    modified, replaced = False, {}
    for i, (c, refusal) in enumerate(ctx.decisions):
        record = _record(c, refusal, ctx, gm, ctx.predictions.get(i))
        if refusal is None:
            name = _free_name(gm, "pcr_solve")
            module = rewrite(gm, c, ctx.config, name, replaced)
            module.planned_mode = record.jacobian
            _tidy_names(gm, name, replaced)
            record.submodule, modified = name, True
            logger.debug("deeppcr: chain %s (L=%d, p=%d) -> %s", c.segments[0].state_in.name, c.length, c.period, name)
        else:
            logger.debug("deeppcr: chain at %s refused: %s", c.segments[0].state_in.name, refusal)
        ctx.report.chains.append(record)
    return PassResult(gm, modified)


def recompile_pass(gm: fx.GraphModule, ctx: Context) -> PassResult:
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, False)


PIPELINE: tuple[Callable, ...] = (shape_prop_pass, find_chains_pass, validate_pass, decide_pass, rewrite_pass,
                                  recompile_pass)


class _GraphText:
    """Formats a graph as readable Python only when a log record is emitted (DEBUG)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm

    def __str__(self) -> str:
        return self.gm.print_readable(print_output=False)


def _snapshot(gm: fx.GraphModule, name: str) -> fx.GraphModule:
    """A copy of ``gm``'s graph (sharing its Parameters and submodules) that later passes cannot change."""
    return fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=name)


def _pass_name(p: Callable) -> str:
    name = p.__name__
    return name[:-len("_pass")] if name.endswith("_pass") else name


def run_pipeline(gm: fx.GraphModule, ctx: Context, passes=PIPELINE) -> PassResult:
    """Run ``passes`` over ``gm``; with ``Config.autotune``, then time the chains' variants on the real
    inputs and keep the faster (``passes/autotune.py``), re-running the passes on a copy of the
    captured graph when that changes a decision."""
    class_name = type(gm).__name__
    capture = _snapshot(gm, "capture")
    result = _run_passes(gm, ctx, passes, capture)
    if not ctx.config.autotune:
        return result

    def build(forced: dict) -> "tuple[PassResult, Context]":
        again = dataclasses.replace(ctx, report=dataclasses.replace(ctx.report, chains=[], graphs={}, notes=[]),
                                    shapes=None, candidates=[], decisions=[], predictions={}, forced=forced)
        return _run_passes(_snapshot(capture, class_name), again, passes, capture), again

    chosen, chosen_ctx = autotune(result, ctx, capture, build)
    if chosen_ctx is not ctx:
        ctx.report.chains, ctx.report.graphs = chosen_ctx.report.chains, chosen_ctx.report.graphs
        ctx.report.notes.extend(chosen_ctx.report.notes)
        ctx.decisions, ctx.predictions, ctx.forced = chosen_ctx.decisions, chosen_ctx.predictions, chosen_ctx.forced
    return chosen


def _run_passes(gm: fx.GraphModule, ctx: Context, passes, capture: fx.GraphModule) -> PassResult:
    ran = []
    history = {"capture": capture}
    logger.debug("deeppcr: captured graph (%s):\n%s", ctx.front_end, _GraphText(gm))
    for p in passes:
        try:
            result = p(gm, ctx)
        except Exception as exc:
            raise PassError(f"deeppcr pass {p.__name__} failed (after {[r for r in ran]}): "
                            f"{type(exc).__name__}: {exc}") from exc
        gm = result.graph_module
        name = _pass_name(p)
        history[name] = _snapshot(gm, name) if result.modified else history[list(history)[-1]]
        if result.modified:
            logger.debug("deeppcr: graph after %s:\n%s", name, _GraphText(gm))
        ran.append(p.__name__)
    history[list(history)[-1]] = gm  # the emitted graph itself
    ctx.report.graphs = history
    # modified: some chain of this graph is rewritten (the caller then runs the graph, else the original)
    return PassResult(gm, any(c.status == REWRITTEN for c in ctx.report.chains if c.graph == ctx.graph_index))


def _record(c: Candidate, refusal: Optional[Refusal], ctx: Context, gm: fx.GraphModule,
            prediction: Optional[Prediction]) -> ChainRecord:
    info = info_of(c.segments[0].state_in)
    shape = info.shape if info is not None and info.is_tensor else None
    width = math.prod(shape[1:] if len(shape) >= 2 else shape) if shape is not None else 0
    batch = shape[0] if shape is not None and len(shape) >= 2 else 1
    mode = jacobians.choose_mode(ctx.config.jacobian, width, ctx.config.full_max_state, c.length * batch)
    slots = slots_of(c) if not c.shapes_differ else None
    return ChainRecord(
        index=len(ctx.report.chains), front_end=ctx.front_end, graph=ctx.graph_index,
        state=c.segments[0].state_in.name, end=c.segments[-1].state_out.name, state_shape=shape,
        dtype=str(info.dtype).replace("torch.", "") if shape is not None else "",
        length=c.length, period=c.period, replaced=tuple(n.name for n in c.nodes), covers=covered_modules(c),
        n_per_step=0 if slots is None else len(slots.per_step_ext) + len(slots.per_step_float),
        n_shared=0 if slots is None else len(slots.shared_ext), jacobian=mode,
        inputs=() if slots is None else _inputs(c, slots, gm),
        status=REWRITTEN if refusal is None else REFUSED,
        reason=None if refusal is None else refusal.reason, detail="" if refusal is None else refusal.detail,
        decision=_decision(len(ctx.report.chains), refusal, ctx, prediction), cost=_cost(ctx, prediction))


def _decision(i: int, refusal: Optional[Refusal], ctx: Context, prediction: Optional[Prediction]) -> str:
    if refusal is not None:
        return f"kept sequential: {refusal}"
    policy = ctx.config.policy
    if i in ctx.forced:
        return f"rewritten (policy='{policy}', autotune): {ctx.forced[i][1]}"
    if policy == "auto" and prediction is not None:
        return f"rewritten (policy='auto'): {prediction.describe()}"
    return f"rewritten (policy='{policy}'): every valid chain of >= min_length={ctx.config.min_length} steps"


def _cost(ctx: Context, prediction: Optional[Prediction]) -> dict:
    """The cost model's estimate (``passes/cost_model.py``) and, after autotuning, the measured times."""
    cost = {"device": ctx.device_type, "margin": MARGIN, "measured": None}
    if prediction is not None:
        cost.update(prediction.to_dict())
    return cost


def _source(n: fx.Node, gm: fx.GraphModule) -> str:
    if n.op == "placeholder":
        return "input"
    if n.op == "get_attr":
        if n.target.rpartition(".")[2].startswith("_tensor_constant"):  # torch.fx's name for a traced constant
            return "constant"
        for kind, get in (("parameter", gm.get_parameter), ("buffer", gm.get_buffer)):
            try:
                get(n.target)
                return kind
            except AttributeError:
                pass
        return "attribute"
    return "computed"


def _inputs(c: Candidate, slots, gm: fx.GraphModule) -> tuple:
    """What each step reads besides the state: per-step (stacked), per-step float coefficients, shared."""
    segs = c.segments
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    start = order.get(segs[0].state_in, -1)

    def describe(kind, first, last):
        info = info_of(first)
        tensor = info is not None and info.is_tensor
        source = _source(first, gm)
        hoisted = source == "computed" and (kind == PER_STEP or order.get(first, -1) > start)
        return InputRecord(kind, first.name, last.name, source, info.shape if tensor else None,
                           str(info.dtype).replace("torch.", "") if tensor else "", hoisted)

    records = [describe(PER_STEP, segs[0].externals[i], segs[-1].externals[i]) for i in slots.per_step_ext]
    records += [InputRecord(COEFFICIENT, repr(segs[0].floats[j]), repr(segs[-1].floats[j]), "constant", (),
                            "float64") for j in slots.per_step_float]
    records += [describe(SHARED, segs[0].externals[i], segs[0].externals[i]) for i in slots.shared_ext]
    return tuple(records)


def _common_name(first: str, last: str) -> str:
    """``first_0_a_weight``, ``first_8_a_weight`` -> ``first_a_weight`` (the parts every step shares)."""
    a, b = first.split("_"), last.split("_")
    parts = [x for x, y in zip(a, b) if x == y] if len(a) == len(b) else a
    return "_".join(p for p in parts if p) or "input"


def _renamed(graph: fx.Graph, node: fx.Node, name: str) -> fx.Node:
    with graph.inserting_after(node):
        new = graph.create_node(node.op, node.target, node.args, node.kwargs, name=re.sub(r"\W", "_", name))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new


def _tidy_names(gm: fx.GraphModule, name: str, replaced: dict) -> None:
    """Readable names around a new ``PCRSolve`` call: ``first_a_weight_per_step`` for a stack of the
    steps' weights, ``pcr_solve_0_coef0`` for per-step constants, ``pcr_solve_0_out8`` for state 8."""
    graph = gm.graph
    solve = next(n for n in graph.nodes if n.op == "call_module" and n.target == name)
    coef = 0
    for arg in solve.args[1:]:
        if isinstance(arg, fx.Node) and arg.op == "call_function" and arg.target is torch.stack:
            items = arg.args[0]
            _renamed(graph, arg, f"{_common_name(items[0].name, items[-1].name)}_per_step")
        elif isinstance(arg, fx.Node) and arg.op == "call_module" and \
                isinstance(gm.get_submodule(arg.target), StackedAttributes):
            targets = gm.get_submodule(arg.target).targets
            first, last = (t.replace(".", "_") for t in (targets[0], targets[-1]))
            _renamed(graph, arg, f"{_common_name(first, last)}_per_step")
        elif isinstance(arg, fx.Node) and arg.op == "call_function" and arg.target is torch.tensor:
            _renamed(graph, arg, f"{name}_coef{coef}")
            coef += 1
    renamed = {}
    for user in list(solve.users):
        if user.op == "call_function" and user.target is operator.getitem:
            renamed[user] = _renamed(graph, user, f"{name}_out{user.args[1]}")
    for old, new in replaced.items():  # later chains may start from these states
        replaced[old] = renamed.get(new, new)


def _free_name(gm: fx.GraphModule, base: str) -> str:
    i = 0
    while hasattr(gm, f"{base}_{i}"):
        i += 1
    return f"{base}_{i}"
