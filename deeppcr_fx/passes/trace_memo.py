"""Tracing a repeated module once: the nodes of its first call are replayed for every identical call.

A deep model calls the same kind of module thousands of times (50,000 ``Linear``/``Tanh`` pairs,
a transformer's identical blocks, an RNN cell at every time step). Symbolic tracing runs each
call's Python through torch.fx's proxies, about a hundred microseconds per op; copying the
nodes the first identical call recorded takes a few.

Two calls are identical when everything their trace can depend on is equal (``ModuleMemo.key``):

- the module tree (the module and its descendants, at most ``MAX_MODULES``): each one's class,
  Python attributes (plain values: numbers, strings, ``None``, dtypes, devices, enums and tuples
  of them; functions by identity; anything else and the call is traced as usual), ``training``,
  its Parameters' and buffers' names, types, shapes, strides, dtypes, devices and
  ``requires_grad``; no hooks, no opaque or shared descendant;
- the arguments: their structure, constant values, and which arguments are the same proxy;
- the grad and autocast modes;
- the argument tensors' shapes, strides and dtypes, when the first call asked a proxy for its
  shape (``x.shape``, ``x.dim()``: ``trace.ShapeProxy``); a call that asked nothing does not
  depend on them.

A call is recorded only if its nodes read nothing but its arguments and its tree's tensors (a
tensor made during the call, ``_tensor_constant``, or a value from elsewhere is not replayable),
it returns proxies in tuples, lists or dicts, keeps every module traceable and changes no
attribute of its tree. A replay reads the new tree's tensors (``get_attr`` of the new layer's
weights, shared with earlier reads of the same Parameter as the tracer does), gives each node the
``nn_module_stack`` the call would have given it, counts the module calls, and repeats the first
call's reads of the tree's public attributes, so the guard of ``passes/reads.py`` records the new
module's attributes as a trace would.
"""
from __future__ import annotations

import collections
import enum
import threading
import types
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx
from torch.fx.immutable_collections import immutable_dict

MAX_MODULES = 256  # a bigger tree is a container called once: keying it costs more than it saves
_INTERNAL = frozenset(torch.nn.Module().__dict__) - {"training"}  # torch's own bookkeeping, checked apart
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_PLAIN = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.layout,
          torch.memory_format, torch.Size, enum.Enum, type(Ellipsis))
_FUNCTIONS = (types.FunctionType, types.BuiltinFunctionType)
MISS = object()
_NO = object()
_get = object.__getattribute__


def _plain_key(v: Any) -> Any:
    if isinstance(v, _PLAIN):
        return (type(v), v)
    if isinstance(v, (tuple, frozenset)) and type(v) in (tuple, frozenset):
        items = tuple(_plain_key(x) for x in v)
        return _NO if any(x is _NO for x in items) else (type(v), items)
    if isinstance(v, _FUNCTIONS):
        return ("fn", id(v))  # the same function object; what it reads is the model's globals
    return _NO


def _tensor_key(t: Optional[torch.Tensor]) -> Any:
    if t is None:
        return None
    return (type(t), t.shape, t.stride(), t.dtype, t.device, t.requires_grad)


@dataclass
class _Entry:
    path: str
    depth: int  # len(module_stack) outside the call
    arg_nodes: list  # the first call's distinct argument nodes, in order
    nodes: list  # the nodes it made, in order
    attrs: dict  # get_attr node it read -> the tensor's path in the tree
    stacks: dict  # node -> ((relative module path, call number in the call, module type), ...) inside
    out: Any
    reads: tuple  # (relative module path, attribute name)
    calls: dict  # relative module path -> how many times the call called it
    metas: Any  # the argument metas when the first call asked for shapes, else None


class ModuleMemo:
    """The recorded calls of one trace, and the replays (``trace.InliningTracer`` drives it)."""

    def __init__(self, tracer: fx.Tracer) -> None:
        self.tracer = tracer
        self.entries: dict = {}
        self.queries = 0  # shape questions asked of proxies so far (ShapeProxy counts them)
        self.hits = 0

    # --- keys -----------------------------------------------------------------------------
    def key(self, m: torch.nn.Module, path: str, args: tuple, kwargs: dict) -> Optional[tuple]:
        """Everything a call of ``m`` can depend on (see the module docstring), or None: trace it as usual."""
        try:
            tree = self._tree(m, path)
            shape = None if tree is None else self._arguments((args, kwargs), [])
            if tree is None or shape is _NO:
                return None
            key = (tree, shape, torch.is_grad_enabled(), torch.is_autocast_enabled())
            hash(key)
        except Exception:  # noqa: BLE001 - what cannot be keyed (a sparse tensor's strides ...) is traced
            return None
        return key

    def _tree(self, m: torch.nn.Module, path: str) -> Optional[tuple]:
        tracer, parts, todo = self.tracer, [], [(m, path)]
        while todo:
            mod, p = todo.pop()
            try:
                if len(parts) >= MAX_MODULES or p in tracer.opaque or tracer.path_of_module(mod) != p:
                    return None  # too big, kept opaque, or shared with another path (its own call counts)
            except NameError:  # a module made during the trace
                return None
            d = _get(mod, "__dict__")
            if any(d.get(h) for h in _HOOKS):
                return None
            attrs = []
            for k, v in d.items():
                if k not in _INTERNAL:
                    f = _plain_key(v)
                    if f is _NO:
                        return None
                    attrs.append((k, f))
            params = tuple((k, _tensor_key(t)) for k, t in d["_parameters"].items())
            buffers = tuple((k, _tensor_key(t)) for k, t in d["_buffers"].items())
            children = d["_modules"]
            parts.append((type(mod), tuple(attrs), params, buffers, tuple(d["_non_persistent_buffers_set"]),
                          tuple((k, c is None) for k, c in children.items())))
            todo.extend((c, f"{p}.{k}") for k, c in reversed(children.items()) if c is not None)
        return tuple(parts)

    def _arguments(self, a: Any, nodes: list) -> Any:
        if isinstance(a, fx.Proxy):
            if a.tracer is not self.tracer:
                return _NO
            if a.node not in nodes:
                nodes.append(a.node)
            return ("P", nodes.index(a.node))
        if type(a) in (tuple, list):
            items = tuple(self._arguments(x, nodes) for x in a)
            return _NO if any(x is _NO for x in items) else (type(a), items)
        if type(a) is dict:
            items = tuple((k, self._arguments(v, nodes)) for k, v in a.items())
            return _NO if any(v is _NO or not isinstance(k, str) for k, v in items) else (dict, items)
        return _plain_key(a)

    def _metas(self, nodes: list) -> tuple:
        out = []
        for n in nodes:
            v = self.tracer.meta_of(n)
            out.append((tuple(v.shape), v.stride(), v.dtype, v.requires_grad) if isinstance(v, torch.Tensor) else None)
        return tuple(out)

    # --- recording --------------------------------------------------------------------------
    def record(self, key: tuple, m: torch.nn.Module, path: str, args: tuple, kwargs: dict, call) -> Any:
        """Run ``call()`` (the traced call of ``m``) and keep what it recorded, if it can be replayed."""
        tracer = self.tracer
        last, queries, opaque = tracer.graph._root.prev, self.queries, len(tracer.opaque)
        depth = len(tracer.module_stack)
        tree = {id(sub): rel for rel, sub in m.named_modules(remove_duplicate=False)}
        counts = {rel: tracer.num_calls.get(_join(path, rel), 0) for rel in tree.values()}
        with _reads_of(tree) as reads:
            out = call()
        if len(tracer.opaque) != opaque or self.key(m, path, args, kwargs) != key:
            return out
        arg_nodes: list = []
        self._arguments((args, kwargs), arg_nodes)
        entry = self._entry(m, path, depth, arg_nodes, last, out, counts)
        if entry is not None:
            entry.reads = tuple(dict.fromkeys(reads))
            entry.calls = {rel: tracer.num_calls.get(_join(path, rel), 0) - c for rel, c in counts.items()
                           if tracer.num_calls.get(_join(path, rel), 0) != c}
            entry.metas = self._metas(arg_nodes) if self.queries != queries else None
            self.entries[key] = entry
        return out

    def _entry(self, m, path, depth, arg_nodes, last, out, counts) -> Optional[_Entry]:
        tracer = self.tracer
        tensors = {}
        for rel, t in list(m.named_parameters(remove_duplicate=False)) + list(m.named_buffers(remove_duplicate=False)):
            tensors.setdefault(id(t), rel)
        nodes, n, root = [], last.next, tracer.graph._root
        while n is not root:
            nodes.append(n)
            n = n.next
        made, known, attrs, stacks = set(nodes), set(arg_nodes), {}, {}
        for n in nodes:
            if n.op not in ("call_function", "call_method", "get_attr"):
                return None
            for a in n.all_input_nodes:
                if a not in made and a not in known and not self._attr(a, tensors, attrs):
                    return None
            if n.op == "get_attr" and not self._attr(n, tensors, attrs):
                return None
            inner = []
            for key, (p, kind) in list(n.meta.get("nn_module_stack", {}).items())[depth:]:
                if p != path and not p.startswith(path + "."):
                    return None
                rel = p[len(path) + 1:]
                number = int(key.rpartition("@")[2]) if "@" in key else 0  # fx's key: path@<calls before>
                inner.append((rel, number - counts.get(rel, 0), kind))
            stacks[n] = tuple(inner)
            for a in n.all_input_nodes:  # a Parameter read before the call: where this call would read it
                if a in attrs and a not in made:
                    stacks.setdefault(a, stacks[n])
        if not _replayable(out, made | known):
            return None
        return _Entry(path, depth, arg_nodes, nodes, attrs, stacks, out, (), {}, None)

    def _attr(self, node: fx.Node, tensors: dict, attrs: dict) -> bool:
        if node.op != "get_attr":
            return False
        if node not in attrs:
            rel = tensors.get(id(self.tracer._fetch(node.target)))
            if rel is None:
                return False
            attrs[node] = rel
        return True

    # --- replaying --------------------------------------------------------------------------
    def replay(self, key: tuple, m: torch.nn.Module, path: str, args: tuple, kwargs: dict) -> Any:
        """The recorded call's nodes for this call of ``m``, or ``MISS``."""
        entry = self.entries.get(key)
        if entry is None:
            return MISS
        tracer = self.tracer
        arg_nodes: list = []
        self._arguments((args, kwargs), arg_nodes)
        if entry.metas is not None:
            self.queries += 1  # this call's nodes depend on the arguments' shapes: so does an enclosing call's
            if self._metas(arg_nodes) != entry.metas:
                return MISS
        env = dict(zip(entry.arg_nodes, arg_nodes))
        outer = list(tracer.module_stack.items())
        base = {rel: tracer.num_calls.get(_join(path, rel), 0) for rel in entry.calls}
        graph, cache = tracer.graph, tracer._proxy_caches[-1] if tracer._proxy_caches else {}

        def node_of(a: fx.Node) -> fx.Node:
            if a in env:
                return env[a]
            name = tracer.tensor_name(_tensor_at(m, entry.attrs[a]))
            if name not in cache:
                node = graph.create_node("get_attr", name)
                node.meta["nn_module_stack"] = self._stack(entry, a, outer, path, base)
                cache[name] = tracer.proxy(node)
            env[a] = cache[name].node
            return env[a]

        for t in entry.nodes:
            if t.op == "get_attr":
                node_of(t)
                continue
            node = append_node(graph, t.op, t.target, fx.node.map_arg(t.args, node_of),
                               fx.node.map_arg(t.kwargs, node_of), None, t.type)
            node.meta["nn_module_stack"] = self._stack(entry, t, outer, path, base)
            env[t] = node
        for rel, count in entry.calls.items():
            tracer.num_calls[_join(path, rel)] = base[rel] + count
        for rel, name in entry.reads:  # the guard records this module's attributes as a trace would
            getattr(m.get_submodule(rel) if rel else m, name)
        self.hits += 1
        return _mapped(entry.out, lambda p: tracer.proxy(env[p.node]))

    def _stack(self, entry: _Entry, t: fx.Node, outer: list, path: str, base: dict) -> collections.OrderedDict:
        stack = collections.OrderedDict(outer)
        for rel, n, kind in entry.stacks.get(t, ()):
            p = _join(path, rel)
            count = base.get(rel, 0) + n
            stack[f"{p}@{count}" if count else p] = (p, kind)
        return stack

    def forget(self) -> None:
        """Drop every recording (the tracer erased nodes: some may be gone)."""
        self.entries.clear()


def append_node(graph: fx.Graph, op: str, target: Any, args: tuple, kwargs: dict, name: Optional[str],
                type_expr: Any = None) -> fx.Node:
    """``graph.create_node(...)`` at the end of ``graph`` for arguments that a node of a graph already had:
    without ``create_node``'s scan of every argument for raw ``SymInt``s (half its time), which those
    arguments passed when they were first recorded. Falls back to ``create_node`` where torch.fx differs."""
    if not _FAST or graph.owning_module is not None:  # a module's node hooks run in create_node
        return graph.create_node(op, target, args, kwargs, name, type_expr)
    namespace = graph._graph_namespace
    name = namespace.create_name(name if name is not None else graph._target_to_str(target), None)
    node = fx.Node(graph, name, op, target, args, kwargs or immutable_dict(), type_expr)
    namespace.associate_name_with_obj(name, node)
    graph._insert(node)
    graph._find_nodes_lookup_table.insert(node)
    graph._len += 1
    return node


_FAST = all(hasattr(fx.Graph(), a) for a in ("_graph_namespace", "_insert", "_find_nodes_lookup_table", "_len"))


def _tensor_at(m: torch.nn.Module, rel: str) -> torch.Tensor:
    *parents, leaf = rel.split(".")
    for atom in parents:
        m = _get(m, "__dict__")["_modules"][atom]
    d = _get(m, "__dict__")
    return d["_parameters"][leaf] if leaf in d["_parameters"] else d["_buffers"][leaf]


def _join(path: str, rel: str) -> str:
    return f"{path}.{rel}" if rel else path


def _replayable(out: Any, nodes: set) -> bool:
    if isinstance(out, fx.Proxy):
        return out.node in nodes
    if type(out) in (tuple, list):
        return all(_replayable(x, nodes) for x in out)
    if type(out) is dict:
        return all(_replayable(x, nodes) for x in out.values())
    return _plain_key(out) is not _NO


def _mapped(out: Any, proxy) -> Any:
    if isinstance(out, fx.Proxy):
        return proxy(out)
    if type(out) in (tuple, list):
        return type(out)(_mapped(x, proxy) for x in out)
    if type(out) is dict:
        return {k: _mapped(v, proxy) for k, v in out.items()}
    return out


class _reads_of:
    """Records, in this thread, the public instance attributes read of the modules ``tree`` (id -> relative
    path) names, through whatever ``nn.Module.__getattribute__`` is in place (``passes/reads.py``'s)."""

    def __init__(self, tree: dict) -> None:
        self.tree, self.reads = tree, []

    def __enter__(self) -> list:
        cls, tree, reads, owner = torch.nn.Module, self.tree, self.reads, threading.get_ident()
        self.own = cls.__dict__.get("__getattribute__")
        current = cls.__getattribute__

        def getattribute(obj, name):
            value = current(obj, name)
            if name[:1] != "_" and name != "training" and id(obj) in tree and threading.get_ident() == owner \
                    and name in _get(obj, "__dict__"):
                reads.append((tree[id(obj)], name))
            return value

        cls.__getattribute__ = getattribute
        return reads

    def __exit__(self, *exc) -> None:
        if self.own is None:
            del torch.nn.Module.__getattribute__
        else:
            torch.nn.Module.__getattribute__ = self.own
