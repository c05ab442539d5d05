"""Tensors a trace made into constants, and the ones that must be made afresh on every call.

Symbolic tracing runs ``torch.zeros(10, 3, 4)`` (all of its arguments concrete) once, at trace
time, and stores the result on the graph as ``_tensor_constant<i>``: every call then reads the
same tensor object. That is harmless while the graph only reads it, and wrong once it writes into
it (``buf[i] = h``) or returns it: eager makes a new tensor per call, the graph would hand every
call the same one, so a later call overwrites an earlier call's result. ``fresh_constants``
replaces each such constant, in every place the graph reads it, by one ``clone()`` of it made
where it is first read — per call, as eager allocates it.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

# ops whose result aliases their first argument (a write into the result writes into it)
_VIEWS = frozenset({"view", "view_as", "reshape", "reshape_as", "transpose", "permute", "select", "narrow",
                    "expand", "expand_as", "squeeze", "unsqueeze", "t", "flatten", "unflatten", "as_strided",
                    "split", "chunk", "unbind", "movedim", "diagonal", "__getitem__", "getitem", "detach"})


def _name(n: fx.Node) -> str:
    return str(getattr(n.target, "__name__", n.target))


def _written_or_returned(node: fx.Node) -> bool:
    """Whether the graph writes into ``node``'s tensor (or a view of it) or returns it (or a view)."""
    seen, todo = {node}, [node]
    while todo:
        n = todo.pop()
        for user in n.users:
            if user.op == "output":
                return True
            name = _name(user)
            first = user.args[0] if user.args else None
            if first is n and (user.target is operator.setitem or name == "__setitem__"
                               or (name.endswith("_") and not name.endswith("__"))):
                return True
            if "out" in user.kwargs:
                return True
            if first is n and (name in _VIEWS or user.target is operator.getitem) and user not in seen:
                seen.add(user)
                todo.append(user)
    return False


def fresh_constants(graph: fx.Graph, created: dict) -> list:
    """Give every trace-made constant in ``created`` (attribute name -> tensor) that the graph writes into
    or returns a fresh copy per call; returns those names.

    Constants that share storage (``buf`` and ``buf[1]``, both made at trace time) stay views of one
    another: the base is cloned once and the others are ``as_strided`` views of the clone."""
    by_target: dict = {}
    for n in graph.nodes:
        if n.op == "get_attr" and n.target in created:
            by_target.setdefault(n.target, []).append(n)
    groups: dict = {}
    for target in by_target:
        groups.setdefault(created[target].untyped_storage().data_ptr(), []).append(target)
    fresh_names = []
    for members in groups.values():
        if not any(_written_or_returned(n) for t in members for n in by_target[t]):
            continue
        base = next((t for t in members if created[t]._base is None), None)
        if base is None or (len(members) > 1 and not created[base].is_contiguous()):
            continue  # views of a tensor the graph does not read: left as traced
        first = min((by_target[t][0] for t in members), key=_position(graph))
        with graph.inserting_before(first):
            source = graph.get_attr(base)
            fresh = graph.call_method("clone", (source,), {"memory_format": torch.contiguous_format})
        offset = created[base].storage_offset()
        for t in members:
            replacement = fresh
            if t != base:
                v = created[t]
                with graph.inserting_before(by_target[t][0]):  # where the trace made the view
                    replacement = graph.call_function(torch.as_strided, (fresh, tuple(v.size()), tuple(v.stride()),
                                                                         v.storage_offset() - offset))
            for n in by_target[t]:
                n.replace_all_uses_with(replacement)
                graph.erase_node(n)
            fresh_names.append(t)
    return fresh_names


def _position(graph: fx.Graph):
    order = {n: i for i, n in enumerate(graph.nodes)}
    return order.__getitem__
