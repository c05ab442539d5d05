"""Keyword inputs for symbolic tracing: which arguments are traced and which are constants.

``torch.fx`` makes a placeholder for every parameter of ``forward``, passed or not: a
``cond=None`` the caller left out becomes a Proxy, so ``if cond is not None`` takes the wrong
branch. ``bind(model, args, kwargs)`` binds the call to ``forward``'s signature: tensors passed
(by position or keyword) are traced; everything else, and every parameter not passed (its
default), is a ``concrete_args`` entry, specialised (the per-call signature keys on the
values). ``drop_constant_placeholders`` then removes the placeholders and equality asserts
fx adds for those constants, so the graph's inputs are exactly the traced tensors, in
signature order (``Inputs``).
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.fx as fx

from ..results import TraceFailure
from .pytrees import Inputs

_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def variadic(model: torch.nn.Module) -> bool:
    """Whether ``forward`` takes ``*args`` or ``**kwargs`` (or its signature cannot be read)."""
    try:
        return any(p.kind in _VARIADIC for p in inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return True


def bind(model: torch.nn.Module, args: tuple, kwargs: dict) -> "tuple[dict, list, Inputs]":
    """``(concrete_args, placeholder_values, inputs)`` for tracing ``model(*args, **kwargs)``.

    ``placeholder_values``: the value of each placeholder fx will create, in order (traced tensors and
    constants alike); ``inputs``: which call arguments the traced graph takes, in its order."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError) as exc:
        raise TraceFailure(f"forward's signature cannot be read ({exc})") from exc
    if any(p.kind in _VARIADIC for p in sig.parameters.values()):
        raise TraceFailure("forward takes *args or **kwargs: keyword inputs are captured by recording a run")
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as exc:
        raise TraceFailure(f"the call does not match forward's signature: {exc}") from exc
    concrete: dict = {}
    values: list = []
    for name, param in sig.parameters.items():
        if name in bound.arguments and isinstance(bound.arguments[name], torch.Tensor):
            values.append(bound.arguments[name])
            continue
        value = bound.arguments[name] if name in bound.arguments else param.default
        if value is inspect.Parameter.empty:
            raise TraceFailure(f"forward's argument {name!r} has no value")
        if isinstance(value, (list, tuple, dict)):  # fx would make a placeholder per leaf
            raise TraceFailure(f"forward's argument {name!r} is a {type(value).__name__}: keyword inputs of that "
                               "form are captured by recording a run")
        concrete[name] = value
        values.append(value)
    positions = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
    names = tuple(n for n in sig.parameters if n in kwargs and isinstance(kwargs[n], torch.Tensor))
    return concrete, values, Inputs(positions, names)


def drop_constant_placeholders(graph: fx.Graph, values: list) -> None:
    """Erase the placeholders fx made for ``concrete_args`` (and the asserts that only read them).

    fx makes one placeholder per parameter, in order (``bind`` keeps constants flat), so the
    ``i``-th placeholder is a constant's when ``values[i]`` is not a tensor."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(values):
        raise TraceFailure(f"keyword binding: {len(placeholders)} graph inputs for {len(values)} arguments")
    for node, value in zip(placeholders, values):
        if not isinstance(value, torch.Tensor) and not _erase_checks(graph, node):
            raise TraceFailure(f"forward's constant argument {node.target!r} is still read by the graph")


def _erase_checks(graph: fx.Graph, node: fx.Node) -> bool:
    doomed: list = []

    def collect(n: Any) -> bool:  # every user is an assert (or a comparison feeding one)
        for u in n.users:
            if u.op == "call_function" and getattr(u.target, "__name__", "") in ("_assert", "_assert_is_none"):
                doomed.append(u)
            elif u.op == "call_function" and collect(u):
                doomed.append(u)
            else:
                return False
        return True

    if not collect(node):
        return False
    for u in dict.fromkeys(doomed):  # collected users first, then what they read
        graph.erase_node(u)
    graph.erase_node(node)
    return True
