"""Front end 1: symbolic tracing that inlines every module, leaf modules included.

``trace(model)`` returns a functional ``torch.fx.GraphModule``: an ``nn.Linear`` becomes
``linear(x, get_attr weight, get_attr bias)``, so a block's parameters appear as
``get_attr`` nodes that the chain finder can turn into per-step slots.

A submodule whose ``forward`` cannot be traced symbolically (it branches on a tensor
value or shape, calls untraceable Python, ...) is rolled back and kept as one opaque
``call_module`` node; ``TraceResult.opaque`` says which and why. Its parameters can
still become per-step slots (``torch.func.functional_call`` on stacked parameters).

Proxies know their shapes: with example inputs, ``x.dim()``, ``x.shape``, ``x.size()``,
``x.ndim`` and ``x.dtype`` are concrete (the graph is specialised to the input signature, as
every compiled graph is). The ``meta``-device values that answer them are computed when a
question is first asked, for every node up to the newest, in the order the nodes were made
(what running each op as it is recorded would give, in-place ops included); a model that
asks nothing computes none (shape propagation runs after the trace anyway). Branching on
tensor *values* still stops symbolic tracing: those modules stay opaque and the validator
refuses chains through them.

If the root ``forward`` itself cannot be traced, ``trace`` raises ``TraceFailure``
with the reason; the caller then tries another front end or runs the model as is.
"""
from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx
from torch.fx._symbolic_trace import _maybe_revert_all_patches

try:  # generates the graph's Python code only when it is first needed
    from torch.fx._lazy_graph_module import _LazyGraphModule as _GraphModule
except ImportError:  # pragma: no cover - older torch: code generated at once (slower, same result)
    _GraphModule = fx.GraphModule

from ..results import TraceFailure
from .constants import fresh_constants
from .hooks import describe_hooks, has_hooks
from .keywords import bind, drop_constant_placeholders, variadic
from .pytrees import Inputs
from .shape_prop import _to_meta, meta_cache_key, meta_forward, on_meta
from .trace_memo import MISS, ModuleMemo
from .trace_patches import _TRACE_LOCK, _own_thread_patches, _random_as_nodes

logger = logging.getLogger(__name__)


@dataclass
class TraceResult:
    graph_module: fx.GraphModule
    opaque: dict = field(default_factory=dict)  # module path -> why its forward stayed opaque
    inputs: Optional[Inputs] = None  # with keyword inputs: the call arguments the graph takes, in order


_META = "pcr_trace_meta"
_MISSING = object()  # no meta value (computed, or not computable)
_PENDING = object()  # not computed yet


class _NoMeta(Exception):
    pass


class ShapeProxy(fx.Proxy):
    """A Proxy whose shape queries answer from the node's meta value when there is one."""

    def _meta(self):
        self.tracer.memo.queries += 1  # the trace now depends on shapes (trace_memo keys on them)
        m = self.tracer.meta_of(self.node)
        return m if isinstance(m, torch.Tensor) else None

    def dim(self):
        m = self._meta()
        return m.dim() if m is not None else self.tracer.create_proxy("call_method", "dim", (self,), {})

    def size(self, dim=None):
        m = self._meta()
        if m is not None:
            return m.size() if dim is None else m.size(dim)
        return self.tracer.create_proxy("call_method", "size", (self,) if dim is None else (self, dim), {})

    @property
    def shape(self):
        m = self._meta()
        return m.shape if m is not None else self.tracer.create_proxy("call_function", getattr, (self, "shape"), {})

    def __len__(self):
        m = self._meta()
        if m is None:
            return super().__len__()
        return len(m)

    @property
    def ndim(self):
        m = self._meta()
        return m.ndim if m is not None else self.tracer.create_proxy("call_function", getattr, (self, "ndim"), {})

    @property
    def dtype(self):
        m = self._meta()
        return m.dtype if m is not None else self.tracer.create_proxy("call_function", getattr, (self, "dtype"), {})


class InliningTracer(fx.Tracer):
    """An ``fx.Tracer`` that traces through every module; untraceable ones become opaque calls.
    A call identical to an earlier one replays the earlier call's nodes (``passes/trace_memo.py``)."""

    memoize = True  # replay identical module calls (off: trace every call's Python)

    def __init__(self, example_inputs: tuple = ()) -> None:
        super().__init__()
        self.memo = ModuleMemo(self)
        self.proxy_buffer_attributes = True  # buffers as get_attr nodes: in-place updates become graph nodes
        self.opaque: dict[str, str] = {}
        self._proxy_caches: list[dict] = []
        self._inputs = [_to_meta(x) for x in example_inputs]
        self._n_placeholders = 0
        self._tensor_names: dict[int, str] | None = None  # id(parameter or buffer) -> qualified name
        self._meta_cache: dict = {}  # (op, target, argument metas) -> output meta: repeated layers hit it
        self._meta_done: Optional[fx.Node] = None  # the newest node whose meta value is computed

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ShapeProxy(node, self)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind == "placeholder":
            i, self._n_placeholders = self._n_placeholders, self._n_placeholders + 1
            node.meta[_META] = self._inputs[i] if i < len(self._inputs) else _MISSING
        return node

    def meta_of(self, node: fx.Node):
        """``node``'s meta value (``_MISSING`` if it has none): the values of every node made before it
        are computed first, in the order they were made, as if each had run when it was recorded."""
        value = node.meta.get(_META, _PENDING)
        if value is not _PENDING or not self._inputs:
            return _MISSING if value is _PENDING else value
        root = self.graph._root
        n = root.next if self._meta_done is None else self._meta_done.next
        while n is not root:
            if _META not in n.meta and n.op != "output":
                n.meta[_META] = self._meta_value(n)
            self._meta_done = n
            if n is node:
                break
            n = n.next
        return node.meta.get(_META, _MISSING)

    def _meta_value(self, node: fx.Node):
        def val(a):
            if isinstance(a, fx.Node):
                v = a.meta.get(_META, _MISSING)
                if v is _MISSING:
                    raise _NoMeta
                return v
            return a

        try:
            args = fx.node.map_aggregate(node.args, val)
            kwargs = dict(fx.node.map_aggregate(node.kwargs, val))
            kwargs.pop("generator", None)
            if node.op == "call_function":
                kwargs = on_meta(node.target, args, kwargs)
            key = meta_cache_key(node.op, node.target, args, kwargs)
            if key is not None and key in self._meta_cache:
                return self._meta_cache[key]
            value = self._run_meta(node, args, kwargs)
            if key is not None:
                self._meta_cache[key] = value
            return value
        except Exception as exc:  # no meta value: shape queries on this proxy stay symbolic
            logger.debug("deeppcr trace: no meta value for %s: %s", node.name, exc)
            return _MISSING

    def _run_meta(self, node: fx.Node, args, kwargs):
        if node.op == "get_attr":  # no patched call involved: skip reverting the tracer's patches
            return _to_meta(self._fetch(node.target))
        # run the real ops, not the tracer's patched Module.__call__/__getattr__ (private torch.fx API)
        with torch.no_grad(), _maybe_revert_all_patches():
            if node.op == "call_function":
                return node.target(*args, **kwargs)
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            if node.op == "call_module":
                mod = self.root.get_submodule(node.target)
                state = {k: _to_meta(v) for k, v in list(mod.named_parameters()) + list(mod.named_buffers())}
                return meta_forward(mod, state, args, kwargs)
        return _MISSING

    def _fetch(self, target: str):
        """``root.<target>`` without the tracer's patched ``Module.__getattr__`` (it would make proxies)."""
        obj = self.root
        for atom in target.split("."):
            if isinstance(obj, torch.nn.Module):
                for table in (obj._parameters, obj._buffers, obj._modules):
                    if atom in table:
                        obj = table[atom]
                        break
                else:
                    obj = object.__getattribute__(obj, atom)
            else:
                obj = getattr(obj, atom)
        return obj

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.opaque

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        """torch.fx's ``Tracer.getattr`` with an id -> name table instead of a scan of all parameters
        per access (which made tracing quadratic in the number of layers)."""
        if not any(c is parameter_proxy_cache for c in self._proxy_caches):
            self._proxy_caches.append(parameter_proxy_cache)
        if not isinstance(attr_val, torch.Tensor):
            return attr_val
        name = self.tensor_name(attr_val)
        if name is None:
            return attr_val
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]

    def tensor_name(self, t: torch.Tensor) -> Optional[str]:
        """The qualified name of the root's Parameter (or buffer) ``t``, or None."""
        if self._tensor_names is None:
            names: dict[int, str] = {}
            for name, x in self.root.named_parameters():
                names.setdefault(id(x), name)
            if self.proxy_buffer_attributes:
                for name, x in self.root.named_buffers():
                    names.setdefault(id(x), name)
            self._tensor_names = names
        return self._tensor_names.get(id(t))

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        if path and path not in self.opaque and has_hooks(m, inert=True):  # called as a module, its hooks fire
            self.opaque[path] = f"has hooks ({describe_hooks(m)}): kept as a module call so they run"
        if path in self.opaque or not path:
            return super().call_module(m, forward, args, kwargs)
        key = self.memo.key(m, path, args, kwargs) if self.memoize and not self.record_stack_traces else None
        if key is not None:
            out = self.memo.replay(key, m, path, args, kwargs)
            if out is not MISS:
                return out
        last = self.graph._root.prev  # the newest node before this call
        stack = collections.OrderedDict(self.module_stack)
        try:
            if key is None:
                return super().call_module(m, forward, args, kwargs)
            return self.memo.record(key, m, path, args, kwargs,
                                    lambda: super(InliningTracer, self).call_module(m, forward, args, kwargs))
        except Exception as exc:  # this module's forward cannot be traced: keep it opaque
            self.module_stack.clear()
            self.module_stack.update(stack)
            self._rollback(last)
            self.opaque[path] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            logger.debug("deeppcr trace: %s (%s) stays opaque: %s", path, type(m).__name__, self.opaque[path])
            return super().call_module(m, forward, args, kwargs)

    def _rollback(self, last: fx.Node) -> None:
        """Erase every node created after ``last`` (newest first) and forget their cached proxies."""
        doomed = []
        node = self.graph._root.prev
        while node is not last:
            doomed.append(node)
            node = node.prev
        erased = set(doomed)
        self.memo.forget()  # recordings may hold erased nodes
        if self._meta_done in erased:
            self._meta_done = last
        for node in doomed:
            self.graph.erase_node(node)
        for cache in self._proxy_caches:
            for name in [k for k, p in cache.items() if p.node in erased]:
                del cache[name]


def trace(model: torch.nn.Module, example_inputs: tuple = (), example_kwargs: Optional[dict] = None) -> TraceResult:
    """Trace ``model`` into a functional GraphModule that shares the model's Parameters.

    Arguments:
        model: the module to trace (its attributes are restored afterwards; nothing else changes).
        example_inputs: the inputs whose meta values answer shape queries while tracing.
        example_kwargs: keyword inputs: with them, the call is bound to ``forward``'s signature
            (``passes/keywords.py``); tensors are traced, other values and defaults are constants.

    Returns:
        ``TraceResult(graph_module, opaque, inputs)``: the graph, the modules kept opaque with why,
        and (with keywords) which call arguments the graph takes, in its order.

    Raises ``TraceFailure`` when the model's own ``forward`` cannot be traced. Thread-safe: one
    trace at a time, and other threads' module calls are unaffected while it runs.
    """
    with _TRACE_LOCK, _own_thread_patches(), torch.random.fork_rng(devices=[]):
        if not example_kwargs and variadic(model):  # forward(*args, **kwargs): fx makes the placeholders
            return _trace(model, example_inputs)
        concrete, values, inputs = bind(model, tuple(example_inputs), dict(example_kwargs or {}))
        result = _trace(model, tuple(values), concrete, values)
        result.inputs = inputs
        return result


def _trace(model: torch.nn.Module, example_inputs: tuple, concrete: Optional[dict] = None,
           values: Optional[list] = None) -> TraceResult:
    tracer = InliningTracer(tuple(example_inputs))
    before = set(vars(model))
    try:
        try:
            with _random_as_nodes(tracer):
                graph = tracer.trace(model, concrete_args=concrete)
        except Exception as exc:
            raise TraceFailure(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
        if concrete is not None:
            drop_constant_placeholders(graph, values)
        fresh_constants(graph, {n: getattr(model, n) for n in set(vars(model)) - before
                                if n.startswith("_tensor_constant")})
        for node in graph.nodes:
            node.meta.pop(_META, None)
        gm = _graph_module(model, graph, model.__class__.__name__)
    finally:  # fx stores tensor constants on the root module: take them back off the user's model
        for name in set(vars(model)) - before:
            delattr(model, name)
    gm.graph.lint()
    return TraceResult(gm, dict(tracer.opaque))


def _graph_module(model: torch.nn.Module, graph: fx.Graph, class_name: str) -> fx.GraphModule:
    """What ``share_children(fx.GraphModule(model, graph), model)`` makes (``passes/live.py``), without
    building and throwing away a copy of every module on the way to each ``get_attr`` target (tens of
    thousands of ``nn.Module`` objects for a deep chain) or generating its Python code now: the
    GraphModule generates it when it is first called (``_LazyGraphModule``), and the passes that follow
    change the graph first."""
    gm = _GraphModule(torch.nn.Module(), fx.Graph(), class_name=class_name)
    gm.training = model.training
    for node in graph.nodes:
        if node.op not in ("get_attr", "call_module"):
            continue
        top = node.target.split(".", 1)[0]
        if top in gm._modules or top in gm._parameters or top in gm._buffers or top in gm.__dict__:
            continue
        if isinstance(model._modules.get(top), torch.nn.Module):  # the model's own child: reads stay live
            gm._modules[top] = model._modules[top]
            continue
        value = getattr(model, top)  # a root Parameter, buffer or trace-made constant, as fx copies it
        if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
            gm.register_buffer(top, value, persistent=top not in model._non_persistent_buffers_set)
        else:
            setattr(gm, top, value)
    gm.graph = graph
    return gm
