"""Where chains may start (DESIGN.md §2, step 1): the graph's floating tensors that no earlier
value of the chain computes — floating inputs, floating tensors built inside forward from
constants, and the first floating tensors computed from non-floating inputs (an embedding of
token ids, a mask turned into additive biases)."""
from __future__ import annotations

from typing import Iterable, Optional

import torch.fx as fx

from .shape_prop import info_of

_FACTORIES = ("zeros", "ones", "full", "empty", "zeros_like", "ones_like", "full_like", "empty_like")


def _floating(n: fx.Node) -> bool:
    info = info_of(n)
    return info is not None and info.is_tensor and info.dtype.is_floating_point


def default_sources(graph: fx.Graph, inputs: Optional[Iterable[fx.Node]] = None) -> list:
    """Where chains may start, in graph order.

    - floating tensor inputs (``inputs``: the placeholders carrying the caller's values; default
      every placeholder);
    - floating tensors built inside forward from constants (a loop's ``h0 = torch.zeros(...)``,
      which tracing turns into a tensor constant);
    - *entry points*: floating tensors computed from the inputs where no floating tensor computed
      from the inputs leads to them (``embedding(input_ids, weight)``: the token ids are integers,
      the weight does not depend on the inputs). A model called with token ids starts its chain of
      layers there. One pass over the graph.
    """
    inputs = set(n for n in graph.nodes if n.op == "placeholder") if inputs is None else set(inputs)
    from_inputs: set = set()  # nodes computed from the inputs
    floating_from_inputs: set = set()  # ... that are floating tensors or computed from such
    found = []
    for n in graph.nodes:
        if n.op == "placeholder":
            if n in inputs and _tensor(n):
                from_inputs.add(n)
                if _floating(n):
                    floating_from_inputs.add(n)
                    found.append(n)
            continue
        args = n.all_input_nodes
        if not _tensor(n):  # shapes, dtypes, devices: no data flows through them
            continue
        if any(a in from_inputs for a in args):
            from_inputs.add(n)
            if any(a in floating_from_inputs for a in args):
                floating_from_inputs.add(n)
            elif _floating(n) and n.op != "output":
                floating_from_inputs.add(n)
                if n.users:
                    found.append(n)
        elif _floating(n) and n.users and _constant(n):
            found.append(n)
    return found


def _tensor(n: fx.Node) -> bool:
    info = info_of(n)
    return info is None or info.is_tensor


def _constant(n: fx.Node) -> bool:
    if n.op == "get_attr":
        return n.target.rpartition(".")[2].startswith("_tensor_constant")
    return n.op == "call_function" and getattr(n.target, "__name__", "") in _FACTORIES \
        and not any(info_of(a) is None or info_of(a).is_tensor and a.op == "placeholder" for a in n.all_input_nodes)
