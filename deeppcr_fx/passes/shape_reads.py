"""Work that reads only a tensor's shape, dtype and device, as the factory call it amounts to.

``torch.zeros_like(h)``, ``h.new_full(size, v)``, ``torch.arange(n, device=h.device)`` read no
value of ``h``, but in a graph they are nodes with ``h`` as an argument, so they count as
computed from it: a chain's step that builds a mask with ``ones_like(state)`` carries it in its
state-dependent core, and a model that builds rotary tables once with ``device=x.device`` from
its first hidden state makes them depend on that state, which then stays live across every
layer (no bottleneck, no chain). A captured graph is specialised to its inputs' shapes, dtypes
and devices (the per-call signature keys on them), so these are constants:

    z = zeros_like(h)                  ->  z = zeros((2, 7, 16), dtype=float64, device=cpu)
    d = getattr(h, "device"); arange(7, device=d)  ->  arange(7, device=cpu)

``constant_shape_reads(gm, device)`` rewrites them (shapes and dtypes from shape propagation,
the device of the example inputs). The recording front end does the same while it records.
Left alone: ops on a graph input itself (they run once, before any chain, and an initial
state such as ``v = zeros_like(x)`` stays paired with ``x``), and fills with a Python float
(``full_like(x[:, :1], t)``: the step template makes a per-step float a coefficient).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from .shape_prop import info_of

# op -> (factory, index of the fill value among the op's arguments or None, method or function)
_FUNCTIONS = {torch.zeros_like: (torch.zeros, None), torch.ones_like: (torch.ones, None),
              torch.empty_like: (torch.empty, None), torch.full_like: (torch.full, 1)}
_METHODS = {"new_zeros": (torch.zeros, None), "new_ones": (torch.ones, None), "new_empty": (torch.empty, None),
            "new_full": (torch.full, 2)}


def home_device(example_inputs) -> Optional[torch.device]:
    """The one device of the example tensors (None when there are none, or several)."""
    devices = {x.device for x in example_inputs if isinstance(x, torch.Tensor)}
    return devices.pop() if len(devices) == 1 else None


def has_shape_reads(gm: fx.GraphModule) -> bool:
    """Whether ``constant_shape_reads`` may change something (one cheap pass, no shapes needed)."""
    return any(n.op == "call_function" and (n.target in _FUNCTIONS or n.target is getattr and n.args[1:] == ("device",))
               or n.op == "call_method" and n.target in _METHODS for n in gm.graph.nodes)


def constant_shape_reads(gm: fx.GraphModule, device: Optional[torch.device]) -> int:
    """Replace shape-only reads of tensors by constants and factory calls; returns how many changed.

    Needs ``node.meta`` from shape propagation; nodes without it are left alone, and so is
    everything when ``device`` is unknown."""
    if device is None:
        return 0
    graph, changed = gm.graph, 0
    for n in list(graph.nodes):
        if n.op == "call_function" and n.target is getattr and len(n.args) == 2 and n.args[1] == "device" \
                and isinstance(n.args[0], fx.Node):
            n.replace_all_uses_with(device)  # fx keeps a torch.device as a constant argument
            graph.erase_node(n)
            changed += 1
            continue
        spec = _FUNCTIONS.get(n.target) if n.op == "call_function" else \
            _METHODS.get(n.target) if n.op == "call_method" else None
        info = info_of(n)
        if spec is None or info is None or not info.is_tensor or n.kwargs.get("requires_grad"):
            continue
        if not n.args or not isinstance(n.args[0], fx.Node) or n.args[0].op == "placeholder":
            continue  # of an input: runs once before everything, and stays paired with it (an RNN's h0)
        factory, fill_at = spec
        args = (tuple(info.shape),)
        if fill_at is not None:
            fill = n.args[fill_at] if len(n.args) > fill_at else n.kwargs.get("fill_value")
            if fill is None or isinstance(fill, (fx.Node, float)):  # a float may differ per step: a coefficient
                continue
            args += (fill,)
        with graph.inserting_before(n):
            new = graph.call_function(factory, args, {"dtype": info.dtype, "device": device})
        new.meta.update(n.meta)
        n.replace_all_uses_with(new)
        graph.erase_node(n)
        changed += 1
    if changed:
        graph.lint()
        gm.recompile()
    return changed
