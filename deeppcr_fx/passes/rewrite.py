"""Rewrite one validated chain into a ``PCRSolve`` call.

Before (a chain of L segments, period p)::

    w0 = get_attr layers.0.weight ; h1 = tanh(linear(x, w0, b0))
    w1 = get_attr layers.1.weight ; h2 = tanh(linear(h1, w1, b1)) ...

After::

    w0 = get_attr ... (state-independent nodes stay where they were: hoisted, same order)
    stack = torch.stack([w0, w1, ...]) ...
    states = pcr_solve_0(x, stack, stack_1, ..., shared...)   # PCRSolve: (L, *x.shape)
    hL = states[L - 1]

State-independent values a step reads are slots: the same node in every segment is a
shared input, different nodes are stacked (``torch.stack`` of the original Parameters,
at call time, so gradients reach them), differing float constants become a float64
tensor. The step template is segment 0 copied into its own graph with the slots as
placeholders.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..config import Config
from ..runtime.pcr_solve import PCRSolve
from ..runtime.stacked import StackedAttributes
from .find_chains import Candidate


@dataclass
class Slots:
    per_step_ext: list  # slot indices into Segment.externals that differ per step
    shared_ext: list
    per_step_float: list  # float positions that differ per step


def slots_of(c: Candidate) -> Slots:
    segs = c.segments
    n_ext = len(segs[0].externals)
    differ = [i for i in range(n_ext) if any(s.externals[i] is not segs[0].externals[i] for s in segs)]
    shared = [i for i in range(n_ext) if i not in differ]
    floats = [j for j in range(len(segs[0].floats)) if any(s.floats[j] != segs[0].floats[j] for s in segs)]
    return Slots(differ, shared, floats)


def _map_args(a, env: dict, floats: dict, counter: list):
    """Mirror of ``find_chains._Form.form``'s traversal: nodes via env, float slots via placeholders."""
    if isinstance(a, fx.Node):
        return env[a]
    if isinstance(a, bool) or a is None:
        return a
    if isinstance(a, float):
        j = counter[0]
        counter[0] += 1
        return floats.get(j, a)
    if isinstance(a, (tuple, list)):
        return type(a)(_map_args(v, env, floats, counter) for v in a)
    if isinstance(a, dict):
        return {k: _map_args(v, env, floats, counter) for k, v in a.items()}
    if isinstance(a, slice):
        return slice(*(_map_args(v, env, floats, counter) for v in (a.start, a.stop, a.step)))
    return a


def step_template(c: Candidate, slots: Slots) -> fx.GraphModule:
    """Segment 0 as a function ``(z, *per_step_slices, *shared) -> z_next``."""
    seg = c.segments[0]
    g = fx.Graph()
    env = {seg.state_in: g.placeholder("z")}
    for k, i in enumerate(slots.per_step_ext):
        env[seg.externals[i]] = g.placeholder(f"step_{k}")
    floats = {j: g.placeholder(f"coef_{k}") for k, j in enumerate(slots.per_step_float)}
    for k, i in enumerate(slots.shared_ext):
        env[seg.externals[i]] = g.placeholder(f"shared_{k}")
    counter = [0]
    for n in seg.nodes:
        args = _map_args(n.args, env, floats, counter)
        kwargs = _map_args(n.kwargs, env, floats, counter)
        env[n] = g.create_node(n.op, n.target, args, kwargs, name=n.name)
    g.output(env[seg.state_out])
    g.lint()
    return fx.GraphModule(torch.nn.Module(), g, "PCRStep")


def covered_modules(c: Candidate) -> tuple:
    """The outermost original module paths each segment's nodes come from (or node names)."""
    names: list = []
    for seg in c.segments:
        for n in seg.nodes:
            for path, _ in (n.meta.get("nn_module_stack") or {}).values():
                path = path.replace("L['self'].", "", 1) if path.startswith("L['self'].") else path  # TorchDynamo
                if path and path != "L['self']" and path not in names:
                    names.append(path)
    paths = set(names)

    def nested(p: str) -> bool:  # some proper dotted prefix of p is itself a covered path
        parts = p.split(".")
        return any(".".join(parts[:i]) in paths for i in range(1, len(parts)))

    top = [p for p in names if not nested(p)]
    return tuple(top) or tuple(s.state_out.name for s in c.segments)


def rewrite(gm: fx.GraphModule, c: Candidate, config: Config, name: str, replaced: dict) -> PCRSolve:
    """Replace chain ``c`` in ``gm`` by a call to a new ``PCRSolve`` submodule ``name``.

    ``replaced`` maps nodes erased by earlier rewrites to their replacements (a chain may
    start where the previous one ended); this rewrite adds its own entries.
    """
    for seg in c.segments:
        seg.state_in = replaced.get(seg.state_in, seg.state_in)
        seg.externals = [replaced.get(x, x) for x in seg.externals]
    slots = slots_of(c)
    template = step_template(c, slots)
    graph, segs = gm.graph, c.segments
    members = set(c.nodes)
    x0, last = segs[0].state_in, segs[-1].state_out
    n_per_step = len(slots.per_step_ext) + len(slots.per_step_float)
    module = PCRSolve(template, c.length, n_per_step, config, covered_modules(c), c.period)
    gm.add_submodule(name, module)
    with graph.inserting_before(last):
        per_step = [_stack(gm, [s.externals[i] for s in segs], f"{name}_per_step_{k}", config)
                    for k, i in enumerate(slots.per_step_ext)]
        if slots.per_step_float:
            device = graph.call_function(getattr, (x0, "device"))
            for j in slots.per_step_float:
                per_step.append(graph.call_function(
                    torch.tensor, ([s.floats[j] for s in segs],), {"dtype": torch.float64, "device": device}))
        shared = [segs[0].externals[i] for i in slots.shared_ext]
        solve_node = graph.call_module(name, (x0, *per_step, *shared))
        outs = {}
        for k, seg in enumerate(segs):
            if seg is segs[-1] or any(u not in members for u in seg.state_out.users):
                outs[seg.state_out] = graph.call_function(operator.getitem, (solve_node, k))
    for old, new in outs.items():
        replaced[old] = new
        old.replace_all_uses_with(new, delete_user_cb=lambda u: u not in members)
    for n in reversed(c.nodes):
        graph.erase_node(n)
    for n in dict.fromkeys(n for x in slots.per_step_ext for n in (s.externals[x] for s in segs)):  # tied: once
        if n.op == "get_attr" and not n.users and n.graph is graph:
            graph.erase_node(n)  # read by the StackedAttributes module now
    graph.lint()
    return module


def _stack(gm: fx.GraphModule, nodes: list, name: str, config: Config) -> fx.Node:
    """The stacked per-step input: one ``StackedAttributes`` call when every entry is an attribute
    (the usual case, per-layer Parameters), else ``torch.stack`` of the nodes."""
    if all(n.op == "get_attr" for n in nodes):
        gm.add_submodule(name, StackedAttributes(gm, [n.target for n in nodes], config.flat_params,
                                                  config.direct_grads))
        return gm.graph.call_module(name, ())
    return gm.graph.call_function(torch.stack, (nodes,))
