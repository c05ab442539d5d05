"""Shape propagation on the meta device: shapes and dtypes without running the model.

Every node gets ``node.meta["pcr"]``: a ``ValueInfo`` (shape and dtype for tensors, the
value itself for small Python constants) or ``None`` where the value could not be
computed. Running on ``meta`` tensors means no arithmetic, no random draws and no
mutation of the user's buffers (BatchNorm in train mode updates only meta copies).

An opaque module whose forward needs tensor *values* (``if x.sum() > 0``) fails on meta
tensors; its node is recorded in ``ShapeInfo.data_dependent`` — the chain validator
refuses such chains with ``DATA_DEPENDENT_CONTROL_FLOW``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx
from torch.nn.utils.stateless import _reparametrize_module

logger = logging.getLogger(__name__)

KEY = "pcr"

# What running a user's op on meta values raises when it cannot: no meta kernel
# (NotImplementedError), a value read from a meta tensor or a kernel's own check (RuntimeError),
# Python code in an opaque module or a user function rejecting its arguments (TypeError,
# ValueError, IndexError, KeyError, AssertionError). Anything else is a bug and propagates.
META_FAILURES = (RuntimeError, NotImplementedError, TypeError, ValueError, IndexError, KeyError, AssertionError)


@dataclass(frozen=True)
class ValueInfo:
    shape: Optional[tuple] = None  # tensors only
    dtype: Optional[torch.dtype] = None
    is_tensor: bool = True
    constant: Any = None  # small Python values (ints, shapes) for non-tensors

    def describe(self) -> str:
        if self.is_tensor:
            return f"{str(self.dtype).replace('torch.', '')}{list(self.shape)}"
        return repr(self.constant)


@dataclass
class ShapeInfo:
    failed: dict = field(default_factory=dict)  # node name -> error
    data_dependent: set = field(default_factory=set)  # opaque call_module nodes needing tensor values


def info_of(node: fx.Node) -> Optional[ValueInfo]:
    return node.meta.get(KEY)


def _to_meta(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return torch.empty_like(x, device="meta").requires_grad_(False) if x.device.type != "meta" else x
    if isinstance(x, (tuple, list)):
        return type(x)(_to_meta(v) for v in x)
    if isinstance(x, dict):
        return {k: _to_meta(v) for k, v in x.items()}
    return x


def _info(value: Any) -> Optional[ValueInfo]:
    if isinstance(value, torch.Tensor):
        return ValueInfo(tuple(value.shape), value.dtype)
    if isinstance(value, (int, float, bool, torch.Size, torch.dtype, str)) or value is None:
        return ValueInfo(is_tensor=False, constant=value)
    if isinstance(value, (tuple, list)) and all(isinstance(v, (int, float, bool)) for v in value):
        return ValueInfo(is_tensor=False, constant=tuple(value))
    return ValueInfo(is_tensor=False, constant=None)


def tensor_key(t: torch.Tensor) -> tuple:
    return ("T", tuple(t.shape), t.stride(), t.dtype, t.requires_grad)


def meta_cache_key(op: str, target: Any, args: Any, kwargs: Any, tensor=tensor_key) -> Optional[tuple]:
    """A hashable description of an op on meta values, or None when it cannot be keyed safely.

    Meta tensors carry only (shape, stride, dtype, requires_grad), so two calls with equal keys
    give equal results: the repeated layers of a deep model compute each meta value once.
    Only ``call_function`` / ``call_method`` results are keyed (attributes and modules differ).
    ``tensor``: how a tensor argument is keyed (``tensor_key``, or a cached equivalent).
    """
    if op not in ("call_function", "call_method"):
        return None

    def key(a):
        if isinstance(a, torch.Tensor):
            return tensor(a)
        if isinstance(a, (tuple, list)):
            return (type(a).__name__, *(key(v) for v in a))
        if isinstance(a, dict):
            return ("dict", *((k, key(v)) for k, v in sorted(a.items())))
        if isinstance(a, slice):
            return ("slice", key(a.start), key(a.stop), key(a.step))
        if a is None or isinstance(a, (bool, int, float, str, torch.dtype, torch.device, torch.memory_format,
                                       torch.layout, type(Ellipsis))):
            return (type(a).__name__, a)
        raise TypeError  # something we cannot key safely: compute without the cache

    try:
        return (op, target, key(args), key(kwargs))
    except TypeError:
        return None


class _MetaInterpreter(fx.Interpreter):
    """Runs the graph on meta values, one node after another, with as little per-node work as it can:
    a 50,000-layer chain is 200,000 nodes. Equal ops on equal metas are computed once (``_cached``);
    the Parameters' metas are shared by shape, stride and dtype (so keys and ``ValueInfo``s are
    looked up by object)."""

    def __init__(self, gm: fx.GraphModule, result: ShapeInfo) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.result = result
        self._attr_cache: dict[str, Any] = {}
        self._attr_metas: dict[tuple, torch.Tensor] = {}  # (shape, stride, dtype) -> one meta Parameter
        self._real_cache: dict[fx.Node, Any] = {}
        self._meta_cache: dict[tuple, Any] = {}  # meta_cache_key -> result
        self._known: dict[int, tuple] = {}  # id(meta tensor) -> (tensor: kept alive, its key, its ValueInfo)

    def run(self, *args) -> None:
        self.args_iter = iter(self.graph.process_inputs(*args))  # as fx.Interpreter.run does (pytree inputs)
        env = self.env

        def value(a: fx.Node) -> Any:
            v = env[a]
            if v is _UNKNOWN:
                raise _Unknown
            return v

        self._value = value
        for n in self.graph.nodes:
            env[n] = self.run_node(n)

    def run_node(self, n: fx.Node) -> Any:
        try:
            if n.op in ("placeholder", "output"):
                value = super().run_node(n)
            else:
                args, kwargs = self._inputs(n)
                value = getattr(self, n.op)(n.target, args, kwargs)
        except _Unknown:
            value = _UNKNOWN
        except META_FAILURES as exc:
            value = self._constant_fallback(n, exc)
        n.meta[KEY] = None if value is _UNKNOWN else self._info(value)
        return value

    def _inputs(self, n: fx.Node) -> tuple:
        """The node's arguments from the values computed so far; ``_Unknown`` if one has none."""
        value, args = self._value, []
        for a in n.args:  # flat arguments (most nodes) without fx's general walk
            if isinstance(a, fx.Node):
                args.append(value(a))
            elif isinstance(a, (tuple, list, dict, slice)):
                args = fx.node.map_arg(n.args, value)
                break
            else:
                args.append(a)
        return tuple(args), (fx.node.map_arg(n.kwargs, value) if n.kwargs else {})

    def _entry(self, t: torch.Tensor) -> tuple:
        entry = self._known.get(id(t))
        if entry is None or entry[0] is not t:
            entry = self._known[id(t)] = (t, tensor_key(t), _info(t))
        return entry

    def _info(self, value: Any) -> Optional[ValueInfo]:
        return self._entry(value)[2] if isinstance(value, torch.Tensor) else _info(value)

    def _constant_fallback(self, n: fx.Node, exc: Exception) -> Any:
        """A value-dependent op on constants only (``(timesteps == t).nonzero()``): compute it for real."""
        try:
            return _to_meta(self._real(n))
        except (_Unknown, *META_FAILURES):
            self.result.failed[n.name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if n.op == "call_module":
                self.result.data_dependent.add(n.name)
            return _UNKNOWN

    def _real(self, n: fx.Node) -> Any:
        """Real value of a node computed from get_attr constants only (never placeholders, never in place)."""
        if n in self._real_cache:
            return self._real_cache[n]
        if n.op == "get_attr":
            value = super().get_attr(n.target, (), {})
        elif n.op in ("call_function", "call_method") and not _in_place(n):
            args = fx.node.map_arg(n.args, self._real)
            kwargs = fx.node.map_arg(n.kwargs, self._real)
            if n.op == "call_function":
                value = n.target(*args, **kwargs)
            else:
                value = getattr(args[0], n.target)(*args[1:], **kwargs)
        else:
            raise _Unknown
        self._real_cache[n] = value
        return value

    def get_attr(self, target, args, kwargs):
        if target not in self._attr_cache:
            real = _attribute(self.module, target)
            if type(real) is torch.nn.Parameter and real.layout is torch.strided:  # shared by shape
                key = (tuple(real.shape), real.stride(), real.dtype)
                if key not in self._attr_metas:
                    self._attr_metas[key] = _to_meta(real)
                self._attr_cache[target] = self._attr_metas[key]
            else:
                self._attr_cache[target] = _to_meta(real)
        return self._attr_cache[target]

    def call_function(self, target, args, kwargs):
        if kwargs.get("generator") is not None:  # never advance the user's generator
            kwargs = {**kwargs, "generator": None}
        return self._cached("call_function", target, args, on_meta(target, args, kwargs), super().call_function)

    def call_method(self, target, args, kwargs):
        if target in ("cpu", "cuda") and isinstance(args[0], torch.Tensor):  # a device move: stay on meta
            return args[0]
        if target == "to":  # x.to("cpu"), x.to(device=...): the device becomes meta
            args, kwargs = _to_on_meta(args, kwargs)
        return self._cached("call_method", target, args, kwargs, super().call_method)

    def _cached(self, op, target, args, kwargs, run):
        key = None
        if not kwargs:  # flat tensors and numbers (most ops): keyed without the general walk
            items = [self._entry(a)[1] if isinstance(a, torch.Tensor) else (type(a).__name__, a)
                     if a is None or type(a) in _FLAT else _NO_KEY for a in args]
            key = None if any(i is _NO_KEY for i in items) else ("flat", op, target, *items)
        if key is None:
            key = meta_cache_key(op, target, args, kwargs, lambda t: self._entry(t)[1])
        if key is None:
            return run(target, args, kwargs)
        if key not in self._meta_cache:
            self._meta_cache[key] = run(target, args, kwargs)
        return self._meta_cache[key]

    def call_module(self, target, args, kwargs):
        mod = self.fetch_attr(target)
        state = {k: _to_meta(v) for k, v in list(mod.named_parameters()) + list(mod.named_buffers())}
        with torch.no_grad():
            return meta_forward(mod, state, args, kwargs)


_FLAT = (bool, int, float, str, torch.dtype)
_NO_KEY = ("no key",)


def _attribute(root: torch.nn.Module, target: str) -> Any:
    """``root.<target>`` as ``fx.Interpreter.fetch_attr`` finds it, through the modules' tables directly."""
    obj = root
    for atom in target.split("."):
        d = getattr(obj, "__dict__", None) if isinstance(obj, torch.nn.Module) else None
        if d is not None and "_modules" in d:
            for table in (d["_parameters"], d["_buffers"], d["_modules"]):
                if atom in table:
                    obj = table[atom]
                    break
            else:
                obj = getattr(obj, atom)
        else:
            obj = getattr(obj, atom)
    return obj


# factory functions that allocate from sizes alone: with no tensor argument they get device="meta"
_FACTORIES = {torch.rand, torch.randn, torch.randint, torch.randperm, torch.normal, torch.zeros, torch.ones,
              torch.empty, torch.full, torch.arange, torch.linspace, torch.eye, torch.tensor}


def on_meta(target: Any, args: tuple, kwargs: dict) -> dict:
    """``kwargs`` for running ``target`` on meta values: factories allocate on the meta device (and so
    draw no random numbers and allocate nothing)."""
    if "device" in kwargs or (target in _FACTORIES and not any(isinstance(a, torch.Tensor) for a in _flat(args))):
        return {**kwargs, "device": "meta"}
    return kwargs


def _to_on_meta(args: tuple, kwargs: dict) -> tuple:
    """``Tensor.to``'s arguments for running it on meta values: any device becomes ``meta``."""
    def device_like(a):
        return isinstance(a, torch.device) or (isinstance(a, str) and a.split(":")[0] in _DEVICE_TYPES)
    args = tuple("meta" if device_like(a) else a for a in args)
    if "device" in kwargs:
        kwargs = {**kwargs, "device": "meta"}
    return args, kwargs


_DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu", "hpu", "meta", "mtia", "privateuseone")


def meta_forward(mod: torch.nn.Module, state: dict, args: tuple, kwargs: dict) -> Any:
    """``mod.forward(*args, **kwargs)`` with ``state`` (meta Parameters and buffers) swapped in, as
    ``torch.func.functional_call`` does, but without calling the module's hooks: their code would
    run on meta values at compile time (a counter would count, a print would print)."""
    with _reparametrize_module(mod, state):
        return mod.forward(*args, **kwargs)


def _in_place(n: fx.Node) -> bool:
    name = str(getattr(n.target, "__name__", n.target))
    return name.endswith("_") and not name.endswith("__")


class _Unknown(Exception):
    pass


_UNKNOWN = object()


def _flat(x):
    if isinstance(x, (tuple, list)):
        for v in x:
            yield from _flat(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _flat(v)
    else:
        yield x


def propagate(gm: fx.GraphModule, example_inputs: tuple) -> ShapeInfo:
    """Annotate every node of ``gm`` with ``node.meta["pcr"]`` for ``example_inputs``."""
    result = ShapeInfo()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        _MetaInterpreter(gm, result).run(*_to_meta(tuple(example_inputs)))
    if result.failed:
        logger.debug("deeppcr shape_prop: no meta value for %s", result.failed)
    return result
