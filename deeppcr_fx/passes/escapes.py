"""Values a step computes for the caller, recomputed from the solved states after the chain.

A transformer layer called with a KV cache hands its keys and values to the caller (the
model's output holds them) besides passing the hidden state on. Those are state-dependent
values leaving the chain: the solve returns states, not every intermediate of every step, so
the validator would refuse the chain (``escaping_value``). This pre-pass, run on a captured
graph before the pipeline, moves such values out of the steps:

    h1 = layer(h0); k1 = key(h0) -> out      h1 = layer(h0) ... hL = layer(hL-1)
    h2 = layer(h1); k2 = key(h1) -> out  =>  hs = gather_states(h0, ..., hL-1)
    ...                                      k1 = key(hs[0]); k2 = key(hs[1]) ... -> out

Each escaping value is recomputed from its step's input state (a copy of the nodes of that
step it depends on, with the same parameters), after the chain's last state. The states reach
the copies through one collector node, ``gather_states``, which the chain finder's relaxed
bottleneck analysis looks through, so the chain is still found; the rewritten graph reads the
states from the solve's output. The same values, computed once more each (the part of a layer
they need: for keys and values, a norm and a projection).

Only escapes whose users all come after the chain's last state are moved, and only when the
nodes they depend on inside the step are plain (no in-place op, no random draw).
"""
from __future__ import annotations

import logging
import operator

import torch
import torch.fx as fx

from .find_chains import find_chains
from .shape_prop import propagate

logger = logging.getLogger(__name__)


def gather_states(*states):
    """The chain's step inputs, gathered for the recomputations that follow the chain."""
    return states


def _plain(n: fx.Node) -> bool:
    name = str(getattr(n.target, "__name__", n.target))
    if n.op not in ("call_function", "call_method") or "rand" in name or "dropout" in name:
        return False
    return not (name.endswith("_") and not name.endswith("__")) and name not in ("setitem", "__setitem__")


def recompute_escapes(gm: fx.GraphModule, example_inputs: tuple, sources=None, shapes_known: bool = False) -> list:
    """Move the values that chains hand to later nodes out of their steps (see the module docstring).

    Returns the report notes (one per chain changed); ``gm.graph`` is changed in place and recompiled.
    ``shapes_known``: shape propagation already ran on this graph."""
    if not _may_escape(gm):
        return []
    if not shapes_known:
        propagate(gm, example_inputs)
    notes = []
    for c in find_chains(gm, sources):
        if c.shapes_differ or c.length < 3 or getattr(c.segments[0], "state_ins", ()):  # tuple states: not yet
            continue
        note = _move(gm.graph, c)
        if note:
            notes.append(note)
    if notes:
        gm.graph.lint()
        gm.recompile()
    return notes


def _may_escape(gm: fx.GraphModule) -> bool:
    """Cheap test: the graph returns several tensors (a KV cache, hidden states) or gathers several
    (``torch.stack(keys)``)."""
    return any(len(n.all_input_nodes) > 2 and (n.op == "output" or n.target in _GATHERS) for n in gm.graph.nodes)


_GATHERS = (torch.stack, torch.cat, torch.concat, torch.concatenate, torch.hstack, torch.vstack)


def _move(graph: fx.Graph, c) -> str:
    members = set(c.nodes)
    outs = {s.state_out for s in c.segments}
    order = {n: i for i, n in enumerate(graph.nodes)}
    last = c.segments[-1].state_out
    per_segment = []
    for seg in c.segments:
        seg_nodes = set(seg.nodes)
        escaping = [n for n in seg.nodes if n not in outs and any(u not in members for u in n.users)]
        if any(order[u] <= order[last] for n in escaping for u in n.users if u not in members):
            return ""  # read by something before the chain ends: not a value for the caller
        needed = _ancestry(escaping, seg_nodes)
        if not all(_plain(n) for n in needed):
            return ""
        per_segment.append((seg, escaping, [n for n in seg.nodes if n in needed]))
    if not any(escaping for _, escaping, _ in per_segment):
        return ""
    with graph.inserting_after(last):
        gathered = graph.call_function(gather_states, tuple(s.state_in for s in c.segments))
    cursor, moved = gathered, 0
    for index, (seg, escaping, needed) in enumerate(per_segment):
        if not escaping:
            continue
        with graph.inserting_after(cursor):
            state = cursor = graph.call_function(operator.getitem, (gathered, index))
        env = {seg.state_in: state}
        for n in needed:
            with graph.inserting_after(cursor):
                cursor = env[n] = graph.node_copy(n, lambda a: env.get(a, a))
        for n in escaping:
            n.replace_all_uses_with(env[n], delete_user_cb=lambda u: u not in members)
            moved += 1
    for n in reversed(c.nodes):  # what only the escapes used is dead inside the steps now
        if not n.users and n not in outs and _plain(n):
            graph.erase_node(n)
    logger.debug("deeppcr escapes: %d values recomputed after the chain ending at %s", moved, last.name)
    return (f"{moved} value(s) the steps of the chain ending at {last.name} hand to the caller (e.g. a KV cache) "
            "are recomputed from the solved states after the chain")


def _ancestry(escaping: list, seg_nodes: set) -> set:
    needed, stack = set(), list(escaping)
    while stack:
        n = stack.pop()
        if n in needed or n not in seg_nodes:
            continue
        needed.add(n)
        stack.extend(n.all_input_nodes)
    return needed
