"""Where chains may start (DESIGN.md §2, step 1): the graph's floating tensors that no earlier
value of the chain computes — floating inputs, and floating tensors built inside forward."""
from __future__ import annotations

import torch.fx as fx

from .shape_prop import info_of

_FACTORIES = ("zeros", "ones", "full", "empty", "zeros_like", "ones_like", "full_like", "empty_like")


def default_sources(graph: fx.Graph) -> list:
    """Where chains may start: floating tensor inputs, and floating tensors built inside forward from
    constants (a loop's ``h0 = torch.zeros(...)``, which tracing turns into a tensor constant)."""
    def floating(n: fx.Node) -> bool:
        info = info_of(n)
        return info is not None and info.is_tensor and info.dtype.is_floating_point

    def constant(n: fx.Node) -> bool:
        if n.op == "get_attr":
            return n.target.rpartition(".")[2].startswith("_tensor_constant")
        return n.op == "call_function" and getattr(n.target, "__name__", "") in _FACTORIES \
            and not any(info_of(a) is None or info_of(a).is_tensor and a.op == "placeholder" for a in n.all_input_nodes)

    return [n for n in graph.nodes if floating(n) and (n.op == "placeholder" or (constant(n) and n.users))]
