"""Rewrite one validated chain into a ``PCRSolve`` call.

Before (a chain of L segments, period p)::

    w0 = get_attr layers.0.weight ; h1 = tanh(linear(x, w0, b0))
    w1 = get_attr layers.1.weight ; h2 = tanh(linear(h1, w1, b1)) ...

After::

    w0 = get_attr ... (state-independent nodes stay where they were: hoisted, same order)
    stack = torch.stack([w0, w1, ...]) ...
    states = pcr_solve_0(x, stack, stack_1, ..., shared...)   # PCRSolve: (L, *x.shape)
    hL = states[L - 1]

A state of several tensors (``passes/find_states.py``) enters as a tuple ``(h0, c0)`` and leaves as
one stacked tensor per component: ``h_k = getitem(getitem(states, 0), k - 1)``.

State-independent values a step reads are slots (``passes/template.py``): the same node
in every segment is a shared input, different nodes are stacked (``StackedAttributes`` or
``torch.stack`` of the original Parameters, at call time, so gradients reach them),
differing float constants become a float64 tensor. The step template is the one
``validate`` built and checked. Row writes into a collector buffer that read a step's state
inside the loop (``solution[j] = y_j``) move after the solve and write the solved states
(``passes/collector_writes.py``).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..config import Config
from ..runtime.pcr_solve import PCRSolve
from ..runtime.stacked import StackedAttributes
from .collector_writes import move_late_writes
from .find_chains import Candidate
from .plan import ChainPlan


def covered_modules(c: Candidate) -> tuple:
    """The outermost original module paths each segment's nodes come from (or node names)."""
    names: dict = {}  # an ordered set: a list's membership test made this O(L^2)
    for seg in c.segments:
        for n in seg.nodes:
            for path, _ in (n.meta.get("nn_module_stack") or {}).values():
                path = path.replace("L['self'].", "", 1) if path.startswith("L['self'].") else path  # TorchDynamo
                if path and path != "L['self']":
                    names[path] = None
    paths = set(names)

    def nested(p: str) -> bool:  # some proper dotted prefix of p is itself a covered path
        parts = p.split(".")
        return any(".".join(parts[:i]) in paths for i in range(1, len(parts)))

    top = [p for p in names if not nested(p)]
    return tuple(top) or tuple(s.state_out.name for s in c.segments)


def rewrite(gm: fx.GraphModule, plan: ChainPlan, config: Config, name: str, replaced: dict) -> PCRSolve:
    """Replace ``plan``'s chain in ``gm`` by a call to a new ``PCRSolve`` submodule ``name``.

    The step template is the one ``validate`` built and checked (``plan.template``).
    ``replaced`` maps nodes erased by earlier rewrites to their replacements (a chain may
    start where the previous one ended); this rewrite adds its own entries.
    """
    c, slots = plan.candidate, plan.template.slots
    for seg in c.segments:
        seg.state_in = replaced.get(seg.state_in, seg.state_in)
        seg.state_ins = tuple(replaced.get(n, n) for n in seg.state_ins)
        seg.externals = [replaced.get(x, x) for x in seg.externals]
    graph, segs = gm.graph, c.segments
    members = set(c.nodes)
    multi = c.components > 1
    x0 = tuple(segs[0].ins) if multi else segs[0].state_in
    # after the chain's last node: a state of several tensors ends in several nodes
    last = segs[-1].state_out if not multi else max(c.nodes, key={n: i for i, n in enumerate(graph.nodes)}.get).next
    module = PCRSolve(plan.template.graph_module, c.length, slots.n_per_step, config, covered_modules(c), c.period)
    module.planned_mode = plan.mode
    gm.add_submodule(name, module)
    with graph.inserting_before(last):
        per_step = [_stack(gm, [s.externals[i] for s in segs], f"{name}_per_step_{k}", config)
                    for k, i in enumerate(slots.per_step_ext)]
        if slots.per_step_float:
            device = graph.call_function(getattr, (segs[0].ins[0], "device"))
            for j in slots.per_step_float:
                per_step.append(graph.call_function(
                    torch.tensor, ([s.floats[j] for s in segs],), {"dtype": torch.float64, "device": device}))
        shared = [segs[0].externals[i] for i in slots.shared_ext]
        solve_node = graph.call_module(name, (x0, *per_step, *shared))
        outs = {}
        components = [graph.call_function(operator.getitem, (solve_node, j)) for j in range(c.components)] \
            if multi else [solve_node]
        for k, seg in enumerate(segs):
            for out, states in zip(seg.outs, components):
                # a component passed through from before the chain (not a member) keeps its own node
                if out in members and out not in outs and (seg is segs[-1] or any(u not in members for u in out.users)):
                    outs[out] = graph.call_function(operator.getitem, (states, k))
    for old, new in outs.items():
        replaced[old] = new
        old.replace_all_uses_with(new, delete_user_cb=lambda u: u not in members)
    if outs:  # writes into a collector buffer (solution[j] = y_j) inside the loop read the solved states now
        move_late_writes(graph, list(outs.values()), list(outs.values())[-1])
    for n in reversed(c.nodes):
        graph.erase_node(n)
    for n in dict.fromkeys(n for x in slots.per_step_ext for n in (s.externals[x] for s in segs)):  # tied: once
        if n.op == "get_attr" and not n.users and n.graph is graph:
            graph.erase_node(n)  # read by the StackedAttributes module now
    return module  # the pipeline lints the graph once, after the pass


def _stack(gm: fx.GraphModule, nodes: list, name: str, config: Config) -> fx.Node:
    """The stacked per-step input: one ``StackedAttributes`` call when every entry is an attribute
    (the usual case, per-layer Parameters), else ``torch.stack`` of the nodes."""
    if all(n.op == "get_attr" for n in nodes):
        stacked = StackedAttributes(gm, [n.target for n in nodes], config.flat_params, config.direct_grads)
        stacked.connect = not config.plain_backward_only
        gm.add_submodule(name, stacked)
        return gm.graph.call_module(name, ())
    return gm.graph.call_function(torch.stack, (nodes,))
