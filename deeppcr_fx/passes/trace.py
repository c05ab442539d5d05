"""Front end 1: symbolic tracing that inlines every module, leaf modules included.

``trace(model)`` returns a functional ``torch.fx.GraphModule``: an ``nn.Linear`` becomes
``linear(x, get_attr weight, get_attr bias)``, so a block's parameters appear as
``get_attr`` nodes that the chain finder can turn into per-step slots.

A submodule whose ``forward`` cannot be traced symbolically (it branches on a tensor
value or shape, calls untraceable Python, ...) is rolled back and kept as one opaque
``call_module`` node; ``TraceResult.opaque`` says which and why. Its parameters can
still become per-step slots (``torch.func.functional_call`` on stacked parameters).

Proxies know their shapes: with example inputs, every node also gets a ``meta``-device
value while tracing, so ``x.dim()``, ``x.shape``, ``x.size()``, ``x.ndim`` and ``x.dtype``
are concrete (the graph is specialised to the input signature, as every compiled
graph is). Branching on tensor *values* still stops symbolic tracing: those modules
stay opaque and the validator refuses chains through them.

If the root ``forward`` itself cannot be traced, ``trace`` raises ``TraceFailure``
with the reason; the caller then tries another front end or runs the model as is.
"""
from __future__ import annotations

import builtins
import collections
import contextlib
import functools
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.fx as fx
from torch.fx._symbolic_trace import _maybe_revert_all_patches, _Patcher

from ..results import TraceFailure
from .constants import fresh_constants
from .hooks import describe_hooks, has_hooks
from .keywords import bind, drop_constant_placeholders, variadic
from .live import share_children
from .pytrees import Inputs
from .shape_prop import _to_meta, meta_cache_key, meta_forward, on_meta

logger = logging.getLogger(__name__)


@dataclass
class TraceResult:
    graph_module: fx.GraphModule
    opaque: dict = field(default_factory=dict)  # module path -> why its forward stayed opaque
    inputs: Optional[Inputs] = None  # with keyword inputs: the call arguments the graph takes, in order


_META = "pcr_trace_meta"
_MISSING = object()


class _NoMeta(Exception):
    pass


class ShapeProxy(fx.Proxy):
    """A Proxy whose shape queries answer from the node's meta value when there is one."""

    def _meta(self):
        m = self.node.meta.get(_META, _MISSING)
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
    """An ``fx.Tracer`` that traces through every module; untraceable ones become opaque calls."""

    def __init__(self, example_inputs: tuple = ()) -> None:
        super().__init__()
        self.proxy_buffer_attributes = True  # buffers as get_attr nodes: in-place updates become graph nodes
        self.opaque: dict[str, str] = {}
        self._proxy_caches: list[dict] = []
        self._inputs = [_to_meta(x) for x in example_inputs]
        self._n_placeholders = 0
        self._tensor_names: dict[int, str] | None = None  # id(parameter or buffer) -> qualified name
        self._meta_cache: dict = {}  # (op, target, argument metas) -> output meta: repeated layers hit it

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ShapeProxy(node, self)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind == "placeholder":
            i, self._n_placeholders = self._n_placeholders, self._n_placeholders + 1
            if i < len(self._inputs):
                node.meta[_META] = self._inputs[i]
        elif self._inputs and kind != "output":
            node.meta[_META] = self._meta_value(node)
        return node

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
        if self._tensor_names is None:
            names: dict[int, str] = {}
            for name, t in self.root.named_parameters():
                names.setdefault(id(t), name)
            if self.proxy_buffer_attributes:
                for name, t in self.root.named_buffers():
                    names.setdefault(id(t), name)
            self._tensor_names = names
        name = self._tensor_names.get(id(attr_val))
        if name is None:
            return attr_val
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        if path and path not in self.opaque and has_hooks(m, inert=True):  # called as a module, its hooks fire
            self.opaque[path] = f"has hooks ({describe_hooks(m)}): kept as a module call so they run"
        if path in self.opaque or not path:
            return super().call_module(m, forward, args, kwargs)
        last = self.graph._root.prev  # the newest node before this call
        stack = collections.OrderedDict(self.module_stack)
        try:
            return super().call_module(m, forward, args, kwargs)
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
        for node in doomed:
            self.graph.erase_node(node)
        for cache in self._proxy_caches:
            for name in [k for k, p in cache.items() if p.node in erased]:
                del cache[name]


# torch.fx patches ``nn.Module.__call__``/``__getattr__`` (and wrapped functions in module globals)
# process-wide while it traces. Two of our traces never overlap (a second tracer would find the first
# one's patches in place and record into the first one's graph), and ``_own_thread_patches`` makes
# every patch a no-op for other threads, which keep calling their modules as usual meanwhile.
_TRACE_LOCK = threading.RLock()


def _for_this_thread(new_fn: Callable, orig_fn: Callable) -> Callable:
    owner = threading.get_ident()

    @functools.wraps(new_fn)
    def patched(*args, **kwargs):
        if threading.get_ident() == owner:
            return new_fn(*args, **kwargs)
        return orig_fn(*args, **kwargs)

    return patched


@contextlib.contextmanager
def _own_thread_patches():
    """While tracing, torch.fx's patches act only in the tracing thread."""
    patch, patch_method = _Patcher.patch, _Patcher.patch_method

    def thread_patch(self, frame_dict, name, new_fn, deduplicate=True):
        orig = frame_dict[name] if name in frame_dict else getattr(builtins, name, None)
        return patch(self, frame_dict, name, _for_this_thread(new_fn, orig), deduplicate)

    def thread_patch_method(self, cls, name, new_fn, deduplicate=True):
        return patch_method(self, cls, name, _for_this_thread(new_fn, getattr(cls, name)), deduplicate)

    _Patcher.patch, _Patcher.patch_method = thread_patch, thread_patch_method
    try:
        yield
    finally:
        _Patcher.patch, _Patcher.patch_method = patch, patch_method


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


# Random draws whose arguments are all concrete (``torch.randn(h.shape)``: shapes are concrete while
# tracing) would run once at trace time and become a constant: the same "noise" on every call, and an
# RNG that never advances. While tracing they are recorded as graph nodes instead, drawn on every call.
_RANDOM = ("rand", "randn", "randint", "randperm", "normal", "bernoulli", "poisson", "multinomial",
           "rand_like", "randn_like", "randint_like")


_DRAWING = threading.local()  # .tracer: the tracer recording random draws in this thread, if any
_DRAWS: dict = {}  # name -> the one patched function: torch's caches may keep it, so it holds no tracer


def _draw(fn: Callable) -> Callable:
    def draw(*args, **kwargs):
        tracer = getattr(_DRAWING, "tracer", None)
        if tracer is None:  # another thread, or no trace running
            return fn(*args, **kwargs)
        return tracer.create_proxy("call_function", fn, args, kwargs)
    return draw


@contextlib.contextmanager
def _random_as_nodes(tracer: fx.Tracer):
    originals = {name: getattr(torch, name) for name in _RANDOM if hasattr(torch, name)}
    previous, _DRAWING.tracer = getattr(_DRAWING, "tracer", None), tracer
    try:
        for name, fn in originals.items():
            setattr(torch, name, _DRAWS.setdefault(name, _draw(fn)))
        yield
    finally:
        _DRAWING.tracer = previous
        for name, fn in originals.items():
            setattr(torch, name, fn)


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
        gm = share_children(fx.GraphModule(tracer.root, graph, model.__class__.__name__), model)
    finally:  # fx stores tensor constants on the root module: take them back off the user's model
        for name in set(vars(model)) - before:
            delattr(model, name)
    gm.graph.lint()
    return TraceResult(gm, dict(tracer.opaque))
