"""Canonical forms: what a list of nodes computes, never what its nodes are called (``find_chains`` step 3).

A piece's form is ``(op, target, argument structure)`` per node, where arguments are the
piece's input state, its own nodes by position, external values by first-use slot, and
constants; floats are slots too (a per-step constant such as a schedule coefficient may differ
per step). The *loose* key leaves shapes out; the *strict* key adds every shape and dtype.
``map_args`` is the one traversal of a node's arguments: it numbers a segment's float slots for
the finder here and for the step template (``passes/template.py``) alike.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.fx as fx

from .shape_prop import info_of

_LITERALS = (int, str, torch.dtype, torch.device, torch.layout, torch.memory_format)


def target_key(node: fx.Node, gm: Optional[fx.GraphModule], strict: bool, modules: Optional[dict] = None) -> Any:
    """What a node computes, never its name: an opaque module counts by type (and parameter shapes).
    ``modules``: a cache (target -> key) for one search, so each module is looked at once."""
    if node.op == "call_module" and gm is not None:
        cached = None if modules is None else modules.get((node.target, strict))
        if cached is None:
            mod = gm.get_submodule(node.target)
            params = tuple((k, tuple(v.shape)) for k, v in mod.state_dict().items()) if strict else ()
            cached = ("module", type(mod), params)
            if modules is not None:
                modules[(node.target, strict)] = cached
        return cached
    return (node.op, node.target)


def map_args(a: Any, on_node: Callable[[fx.Node], Any], on_float: Callable[[float], Any]) -> Any:
    """The one traversal of a node's arguments: nodes and floats replaced, containers rebuilt.

    Its visiting order numbers a segment's float slots, so the canonical form below and the
    step template (``passes/template.py``) both go through this function and cannot drift.
    """
    if isinstance(a, fx.Node):
        return on_node(a)
    if isinstance(a, bool) or a is None:
        return a
    if isinstance(a, float):
        return on_float(a)
    if isinstance(a, (tuple, list)):
        items = [map_args(v, on_node, on_float) for v in a]
        return type(a)(*items) if hasattr(a, "_fields") else type(a)(items)  # namedtuples take fields
    if isinstance(a, dict):
        return {k: map_args(v, on_node, on_float) for k, v in a.items()}
    if isinstance(a, slice):
        return slice(*(map_args(v, on_node, on_float) for v in (a.start, a.stop, a.step)))
    return a


class _Key(tuple):
    """A canonical key already made (a node's or a float's), left alone by ``_freeze``."""


def _freeze(a: Any) -> Any:
    """The hashable canonical form of an argument structure that ``map_args`` produced."""
    if isinstance(a, _Key):
        return tuple(a)
    if isinstance(a, bool) or a is None:
        return a
    if isinstance(a, _LITERALS):
        return (type(a).__name__, a)
    if isinstance(a, (tuple, list)):
        return (type(a).__name__,) + tuple(_freeze(v) for v in a)
    if isinstance(a, dict):
        return ("dict",) + tuple((k, _freeze(v)) for k, v in a.items())
    if isinstance(a, slice):
        return ("slice", _freeze(a.start), _freeze(a.stop), _freeze(a.step))
    return ("object", id(a))  # unknown objects match only themselves


class _Form:
    """Canonical form of a list of nodes read from one input state.

    One walk makes both keys: ``loose`` (ops, targets, argument structure) and, when first asked,
    ``strict`` (``loose`` plus every node's and external's shape and dtype, and opaque modules'
    parameter shapes); ``key`` is the one ``strict`` asked for."""

    def __init__(self, state_in, nodes: list, strict: bool, gm, modules: Optional[dict] = None) -> None:
        """``state_in``: the state's node, or a tuple of its components (keyed by position)."""
        multi = isinstance(state_in, tuple)
        self.state_index = {n: _Key(("S", j)) for j, n in enumerate(state_in)} if multi else {state_in: _Key(("S",))}
        self.want_strict, self.gm, self.modules = strict, gm, {} if modules is None else modules
        self.nodes = nodes
        self.local = {n: i for i, n in enumerate(nodes)}
        self.externals: list = []
        self._ext_index: dict = {}
        self.floats: list = []
        self._strict = None
        self.loose = tuple(self._node(n) for n in nodes)

    @property
    def strict(self) -> tuple:
        if self._strict is None:
            self._strict = (self.loose, tuple(map(_shape, self.nodes)), tuple(map(_shape, self.externals)),
                            tuple(target_key(n, self.gm, True, self.modules) for n in self.nodes
                                  if n.op == "call_module"))
        return self._strict

    @property
    def key(self) -> tuple:
        return self.strict if self.want_strict else self.loose

    def _node(self, n: fx.Node) -> tuple:
        return (n.op, target_key(n, self.gm, False, self.modules), self.form(n.args), self.form(n.kwargs))

    def form(self, a: Any) -> Any:
        """``_freeze(map_args(a, ...))``; a flat tuple or dict (most arguments) in one walk, same result."""
        kind = type(a)
        if kind is not tuple and kind is not dict:
            return _freeze(map_args(a, self._node_key, self._float_key))
        out = ["tuple" if kind is tuple else "dict"]
        for k, v in (enumerate(a) if kind is tuple else a.items()):
            if isinstance(v, fx.Node):
                v = tuple(self._node_key(v))
            elif isinstance(v, bool) or v is None:
                pass
            elif isinstance(v, float):
                self.floats.append(v)
                v = ("F",)
            elif isinstance(v, _LITERALS):
                v = (type(v).__name__, v)
            else:
                v = _freeze(map_args(v, self._node_key, self._float_key))
            out.append(v if kind is tuple else (k, v))
        return tuple(out)

    def _node_key(self, a: fx.Node) -> _Key:
        if a in self.state_index:
            return self.state_index[a]
        if a in self.local:
            return _Key(("L", self.local[a]))
        if a not in self._ext_index:
            self._ext_index[a] = len(self.externals)
            self.externals.append(a)
        return _Key(("E", self._ext_index[a], a.op))

    def _float_key(self, a: float) -> _Key:
        self.floats.append(a)
        return _Key(("F",))


def _shape(n: fx.Node) -> Any:
    info = info_of(n)
    return None if info is None else (info.shape, info.dtype, info.is_tensor,
                                       None if info.is_tensor else _hashable(info.constant))


def _hashable(x: Any) -> Any:
    try:
        hash(x)
        return x
    except TypeError:
        return repr(x)


def canonical(state_in, nodes: list, strict: bool, gm=None, modules: Optional[dict] = None) -> _Form:
    return _Form(state_in, nodes, strict, gm, modules)


def _slots(state_in, nodes: list) -> tuple[list, list]:
    """A segment's externals (first-use order) and floats: the slots of its canonical form, without the key."""
    state, local = set(state_in) if isinstance(state_in, tuple) else {state_in}, set(nodes)
    externals: list = []
    floats: list = []
    seen: set = set()

    def on_node(a: fx.Node) -> None:
        if a not in state and a not in local and a not in seen:
            seen.add(a)
            externals.append(a)

    for n in nodes:
        map_args(n.args, on_node, floats.append)
        map_args(n.kwargs, on_node, floats.append)
    return externals, floats
