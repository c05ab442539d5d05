"""The report's words for each chain: a ``ChainRecord`` built from its ``ChainPlan``.

Built by the ``describe`` pass, after ``decide`` and before ``rewrite`` changes the graph,
so every name, source and position is the graph's as it was analysed. Nothing here decides
anything: the mode, the refusal and the decision are the plan's.
"""
from __future__ import annotations


import torch.fx as fx

from ..inspect.report import ChainRecord, InputRecord
from ..results import COEFFICIENT, PER_STEP, REFUSED, REWRITTEN, SHARED
from .cost_model import MARGIN
from .find_chains import Candidate
from .options import CompileOptions
from .plan import ChainPlan
from .rewrite import covered_modules
from .shape_prop import info_of
from .template import Slots


def chain_record(index: int, plan: ChainPlan, gm: fx.GraphModule, options: CompileOptions) -> ChainRecord:
    """The ``ChainRecord`` of ``plan`` (chain number ``index`` of this graph)."""
    c = plan.candidate
    info = info_of(c.segments[0].state_in)
    shape = info.shape if info is not None and info.is_tensor else None
    slots = plan.template.slots if plan.template is not None else (None if c.shapes_differ else Slots.of(c))
    refusal = plan.refusal
    return ChainRecord(
        index=index, front_end=options.front_end, graph=options.graph_index,
        state=_names(c.segments[0].ins), end=_names(c.segments[-1].outs), state_shape=shape,
        dtype=_dtype(info) if shape is not None else "",
        length=c.length, period=c.period, replaced=tuple(n.name for n in c.nodes), covers=covered_modules(c),
        n_per_step=0 if slots is None else slots.n_per_step,
        n_shared=0 if slots is None else len(slots.shared_ext), jacobian=plan.mode,
        inputs=() if slots is None else _inputs(c, slots, gm),
        status=REWRITTEN if refusal is None else REFUSED,
        reason=None if refusal is None else refusal.reason, detail="" if refusal is None else refusal.detail,
        decision=plan.decision, cost=_cost(options, plan))


def _names(nodes: tuple) -> str:
    """A state's node name; a state of several tensors as ``(h, c)`` (the shape shown is the first's)."""
    return nodes[0].name if len(nodes) == 1 else "(" + ", ".join(n.name for n in nodes) + ")"


def _dtype(info) -> str:
    return str(info.dtype).replace("torch.", "")


def _cost(options: CompileOptions, plan: ChainPlan) -> dict:
    """The cost model's estimate (``passes/cost_model.py``) and, after autotuning, the measured times."""
    cost = {"device": options.device_type, "margin": MARGIN, "measured": None}
    if plan.prediction is not None:
        cost.update(plan.prediction.to_dict())
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


def _inputs(c: Candidate, slots: Slots, gm: fx.GraphModule) -> tuple:
    """What each step reads besides the state: per-step (stacked), per-step float coefficients, shared."""
    segs = c.segments
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    start = min(order.get(n, -1) for n in segs[0].ins)

    def describe(kind: str, first: fx.Node, last: fx.Node) -> InputRecord:
        info = info_of(first)
        tensor = info is not None and info.is_tensor
        source = _source(first, gm)
        hoisted = source == "computed" and (kind == PER_STEP or order.get(first, -1) > start)
        return InputRecord(kind, first.name, last.name, source, info.shape if tensor else None,
                           _dtype(info) if tensor else "", hoisted)

    records = [describe(PER_STEP, segs[0].externals[i], segs[-1].externals[i]) for i in slots.per_step_ext]
    records += [InputRecord(COEFFICIENT, repr(segs[0].floats[j]), repr(segs[-1].floats[j]), "constant", (),
                            "float64") for j in slots.per_step_float]
    records += [describe(SHARED, segs[0].externals[i], segs[0].externals[i]) for i in slots.shared_ext]
    return tuple(records)


def records_of(plans: list) -> list:
    """The records the ``describe`` pass attached, in chain order."""
    return [p.record for p in plans if p.record is not None]


