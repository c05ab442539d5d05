"""One step of a chain as its own small graph: the slots it reads and the step template.

A validated chain's segments differ only in what they read besides the state. Each such
value is a *slot* (``Slots``): the same node in every segment is a shared input, different
nodes are per-step inputs (stacked along L), and float constants that differ per step become
per-step coefficients. ``StepTemplate.build(candidate)`` copies segment 0 into its own graph
``(z, *per_step_slices, *coefficients, *shared) -> z_next`` (``z`` a tuple for a state of several
tensors, ``passes/find_states.py``) — built once, by ``validate``,
which runs it on meta values, and handed to ``rewrite`` inside the chain's ``ChainPlan``.

The copy walks each node's arguments with ``canonical.map_args``, the traversal that
numbered the float slots, so the template's coefficients are the slots the finder saw. Fused
recurrent cells (``torch.gru_cell``, ...), which vmap cannot batch, become plain ops
(``passes/decompose.py``), and a per-step coefficient used as a fill value
(``full_like(x, i * dt)``: the op wants a Python number) becomes ``ones_like(x) * c``; so do other
ops whose coefficient is a Python-number argument (``add(alpha=)``, ``leaky_relu``, ``hardtanh``,
``elu``, ``softplus``: ``passes/scalar_args.py``).
"""
from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from .decompose import DECOMPOSITIONS
from .canonical import map_args
from .find_chains import Candidate
from .scalar_args import tensor_form


@dataclass(frozen=True)
class Slots:
    """Which of a segment's externals and floats are per-step, and which are shared."""

    per_step_ext: tuple  # slot indices into Segment.externals that differ per step
    shared_ext: tuple
    per_step_float: tuple  # float positions (in map_args order) that differ per step

    @classmethod
    def of(cls, c: Candidate) -> "Slots":
        segs = c.segments
        n_ext = len(segs[0].externals)
        differ = tuple(i for i in range(n_ext) if any(s.externals[i] is not segs[0].externals[i] for s in segs))
        shared = tuple(i for i in range(n_ext) if i not in differ)
        floats = tuple(j for j in range(len(segs[0].floats)) if any(s.floats[j] != segs[0].floats[j] for s in segs))
        return cls(differ, shared, floats)

    @property
    def n_per_step(self) -> int:
        """Per-step inputs of the solve: stacked tensors, then coefficients."""
        return len(self.per_step_ext) + len(self.per_step_float)


@dataclass(frozen=True)
class StepTemplate:
    """A chain's slots and its one-step GraphModule ``(z, *per_step, *coefficients, *shared) -> z_next``."""

    slots: Slots
    graph_module: fx.GraphModule

    @classmethod
    def build(cls, c: Candidate) -> "StepTemplate":
        slots = Slots.of(c)
        seg = c.segments[0]
        g = fx.Graph()
        z = g.placeholder("z")
        if c.components == 1:
            env = {seg.state_in: z}
        else:  # a tuple state: the solver passes (and wants back) the components in the segment's order
            env = {n: g.call_function(operator.getitem, (z, j)) for j, n in enumerate(seg.state_ins)}
        for k, i in enumerate(slots.per_step_ext):
            env[seg.externals[i]] = g.placeholder(f"step_{k}")
        coefficients = {j: g.placeholder(f"coef_{k}") for k, j in enumerate(slots.per_step_float)}
        for k, i in enumerate(slots.shared_ext):
            env[seg.externals[i]] = g.placeholder(f"shared_{k}")
        position = itertools.count()

        def on_float(value: float):
            return coefficients.get(next(position), value)

        slots_now = set(coefficients.values())
        for n in seg.nodes:
            args = map_args(n.args, env.__getitem__, on_float)
            kwargs = map_args(n.kwargs, env.__getitem__, on_float)
            scalar = tensor_form(n.op, n.target, args, kwargs, slots_now)
            if scalar is not None:  # a coefficient where the op wants a Python number (alpha=, negative_slope)
                env[n] = g.call_function(scalar[0], scalar[1], kwargs, name=n.name)
                continue
            env[n] = _filled(g, n, args, kwargs, slots_now) or g.create_node(
                n.op, DECOMPOSITIONS.get(n.target, n.target) if n.op == "call_function" else n.target,
                args, kwargs, name=n.name)
        g.output(env[seg.state_out] if c.components == 1 else tuple(env[n] for n in seg.state_outs))
        g.lint()
        return cls(slots, fx.GraphModule(torch.nn.Module(), g, "PCRStep"))


def _filled(g: fx.Graph, n: fx.Node, args: tuple, kwargs: dict, coefficients: set):
    """``full_like(t, c)`` / ``t.new_full(size, c)`` / ``full(size, c)`` with a per-step coefficient ``c``
    (a 0-d tensor in the template; these ops want a Python number) as ``ones * c``: the same values."""
    if n.op == "call_function" and n.target in (torch.full_like, torch.full):
        head, fill, rest = args[:1], args[1] if len(args) > 1 else kwargs.get("fill_value"), args[2:]
        ones = torch.ones_like if n.target is torch.full_like else torch.ones
    elif n.op == "call_method" and n.target == "new_full":
        head, fill, rest = args[:2], args[2] if len(args) > 2 else kwargs.get("fill_value"), args[3:]
        ones = "new_ones"
    else:
        return None
    if fill not in coefficients:
        return None
    kwargs = {k: v for k, v in kwargs.items() if k != "fill_value"}
    op = "call_method" if isinstance(ones, str) else "call_function"
    base = g.create_node(op, ones, (*head, *rest), kwargs)
    return g.call_function(operator.mul, (base, fill))
