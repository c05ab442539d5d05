"""Python values a trace read, and the guard that re-checks them on every call.

Tracing turns ``self.temperature``, ``range(self.num_steps)``, ``self.config.scale``, a
scheduler's ``num_inference_steps`` or a module-level ``SCALE`` into constants of the emitted
graph: assumptions about Python state. ``recording_reads`` records them while a model is traced
(in the tracing thread only; other threads are unaffected), ``AttributeGuard.holds()`` compares
them with the values now, and a compiled module whose guard fails specialises again.

What is recorded (of modules, public names only; of other objects, ``_private`` ones too, where a
property keeps its value; state the trace itself moves, such as a scheduler's step counter, is not):

- **Module attributes**: every read of an entry of a module's instance ``__dict__`` (not
  ``training``, which the signature covers): plain values (numbers, strings, ``None``, enums,
  tuples and lists of them) by value; tensors that are plain attributes (not Parameters or
  buffers, which are graph inputs) and objects of user classes (``self.config``,
  ``self.scheduler``) by identity.
- **Attributes of objects reached from modules**: an object of a Python class read from a
  module (a config dataclass, a diffusers scheduler and its ``config``) has its class's
  ``__getattribute__`` wrapped while the trace runs, so reads of its instance ``__dict__``
  entries are recorded the same way, and so on for objects reached from it. A value the trace
  itself changed (the scheduler's ``set_timesteps`` called in ``forward``, a counter) is derived
  state, not an assumption: it is left out, and so is one the trace set before reading it (the
  schedule tensors ``set_timesteps`` makes anew on every call, eager calls in between included).
- **Module-level globals**: the ``LOAD_GLOBAL`` names in the code of the model's own classes (every
  function defined on them or on their bases defined in the same module, nested code included)
  and of the functions defined in that module which that code names (recursively): plain values
  by value, tensors by identity (a global read in a branch that did not run is guarded too). Not
  guarded: globals read by code defined in other modules (a helper imported from elsewhere, a
  library's base class), functions, classes and modules held in globals, values read as
  attributes of an imported module (``cfg.SCALE``), and closure variables.

Attributes the forward *sets* on a module, and globals whose value the trace changed, are Python
side effects the emitted graph would not repeat: they are listed in ``AttributeGuard.writes``,
and the compiled module then runs the model as written.

Cost per call: one C-level pass over the recorded attribute reads (``map(getattr, ...)``) and one
over the recorded globals (``map(dict.get, ...)``): O(number of distinct reads), nothing for a
model that reads none (torch's Linear, Tanh, ... read none; LayerNorm reads its ``eps`` and
``normalized_shape``).
"""
from __future__ import annotations

import contextlib
import dis
import functools
import enum
import sys
import threading
import types
from typing import Iterator

import torch

_PLAIN = (int, float, bool, str, type(None), enum.Enum, torch.dtype, torch.device)
_MISSING = object()
_LIBRARIES = frozenset(sys.stdlib_module_names) | {"torch", "deeppcr_fx", "numpy", "typing_extensions", "builtins"}
_NOT_FOLLOWED = (torch.Tensor, torch.nn.Module, type, types.ModuleType, types.FunctionType, types.MethodType,
                 types.BuiltinFunctionType, types.CodeType)


def _plain(value) -> bool:
    return isinstance(value, _PLAIN) or (isinstance(value, (tuple, list)) and all(isinstance(v, _PLAIN) for v in value))


def _user_module(name) -> bool:
    return isinstance(name, str) and name.split(".")[0] not in _LIBRARIES


def _followed(value) -> bool:
    """An object of a user's Python class (its attribute reads are recorded too)."""
    return hasattr(value, "__dict__") and not isinstance(value, _NOT_FOLLOWED) and _user_module(type(value).__module__)


class _Same:
    """A recorded value compared by identity (a tensor, an object): ``_Same(x) == y`` iff ``y is x``."""

    __slots__ = ("obj",)

    def __init__(self, obj) -> None:
        self.obj = obj

    def __eq__(self, other) -> bool:
        return other is self.obj

    __hash__ = None


def _stored(value):
    """How a read value is kept: plain values by value (a list copied), anything else by identity."""
    if _plain(value):
        return list(value) if isinstance(value, list) else value
    return _Same(value)


class AttributeGuard:
    """The reads of one trace; ``holds()`` says whether all still read the same."""

    def __init__(self) -> None:
        self._seen: dict = {}  # (id(owner), name) -> (owner, name, stored value): modules and objects
        self._globals: dict = {}  # (id(globals dict), name) -> (dict, name, stored value)
        self.writes: list = []  # "Class.name" / "module.name" the capture *set*: Python side effects
        self._before: dict = {}  # (id(module), name) -> (module, name, value before the first write)

    def record(self, owner, name: str, value) -> None:
        self._seen.setdefault((id(owner), name), (owner, name, _stored(value)))

    def freeze(self) -> "AttributeGuard":
        written = set(self.writes)
        entries = [e for e in self._seen.values() if f"{type(e[0]).__name__}.{e[1]}" not in written
                   and _unchanged(e[2], getattr(e[0], e[1], _MISSING))]  # the trace's own changes: derived
        self.owners = [o for o, _, _ in entries]
        self.names = [n for _, n, _ in entries]
        self.values = [v for _, _, v in entries]
        entries = [e for e in self._globals.values() if _unchanged(e[2], e[0].get(e[1], _MISSING))]
        self.dicts = [d for d, _, _ in entries]
        self.global_names = [n for _, n, _ in entries]
        self.global_values = [v for _, _, v in entries]
        return self

    def note_global_writes(self) -> None:
        """Globals whose value the trace changed: Python side effects (listed in ``writes``)."""
        for d, name, value in self._globals.values():
            what = f"{d.get('__name__', '?')}.{name}"
            if not _unchanged(value, d.get(name, _MISSING)) and what not in self.writes:
                self.writes.append(what)

    def undo_writes(self) -> None:
        """Put back what the capture set (a symbolic trace is not a call of the model); changed globals
        stay listed in ``writes``."""
        self.note_global_writes()
        for module, name, value in self._before.values():
            if value is not _MISSING:
                object.__setattr__(module, name, value)
            elif name in module.__dict__:
                object.__delattr__(module, name)
        for d, name, value in self._globals.values():
            if not _unchanged(value, d.get(name, _MISSING)):
                d[name] = value.obj if isinstance(value, _Same) else value

    def __len__(self) -> int:
        if hasattr(self, "names"):
            return len(self.names) + len(self.global_names)
        return len(self._seen) + len(self._globals)

    def holds(self) -> bool:
        try:  # the recorded values on the left: a _Same compares by identity
            return self.values == list(map(getattr, self.owners, self.names)) \
                and self.global_values == list(map(dict.get, self.dicts, self.global_names))
        except Exception:  # deleted, or a value that no longer compares to a bool
            return False

    def changed(self) -> list:
        """``Owner.name`` of each read whose value differs now (for the log)."""
        out = [f"{type(o).__name__}.{n}" for o, n, v in zip(self.owners, self.names, self.values)
               if not _unchanged(v, getattr(o, n, _MISSING))]
        return out + [f"{d.get('__name__', '?')}.{n}" for d, n, v in zip(self.dicts, self.global_names,
                                                                         self.global_values)
                      if not _unchanged(v, d.get(n, _MISSING))]


def _unchanged(stored, value) -> bool:
    try:
        return bool(stored == value)
    except Exception:  # a value that does not compare to a bool (a tensor, a tracing proxy left behind)
        return False


def _code_objects(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)


@functools.lru_cache(maxsize=4096)
def _global_names(code: types.CodeType) -> tuple:
    return tuple(i.argval for c in _code_objects(code) for i in dis.get_instructions(c) if i.opname == "LOAD_GLOBAL")


def _record_globals(guard: AttributeGuard, model: torch.nn.Module) -> None:
    """The plain (and tensor) globals named by the code of ``model``'s own classes and the user functions
    that code names, with their values now (before the trace)."""
    functions = []
    for cls in {type(m) for m in model.modules()}:
        for klass in cls.__mro__:  # the class and its bases defined beside it (not a library's mixins)
            if _user_module(cls.__module__) and klass.__module__ == cls.__module__:
                for v in vars(klass).values():
                    f = getattr(v, "__func__", getattr(v, "fget", v))  # static/class methods, properties
                    if isinstance(f, types.FunctionType):
                        functions.append(f)
    seen = set()
    while functions:
        f = functions.pop()
        if f.__code__ in seen:
            continue
        seen.add(f.__code__)
        g = f.__globals__
        for name in _global_names(f.__code__):
            value = g.get(name, _MISSING)
            if isinstance(value, types.FunctionType) and value.__module__ == f.__module__:
                functions.append(value)  # a helper defined beside it
            elif not name.startswith("__") and (_plain(value) or isinstance(value, torch.Tensor)):
                guard._globals.setdefault((id(g), name), (g, name, _stored(value)))


@contextlib.contextmanager
def recording_reads(guard: AttributeGuard, model: torch.nn.Module) -> Iterator[AttributeGuard]:
    """Record, in this thread, the Python values the trace of ``model`` reads (see the module docstring)."""
    owner = threading.get_ident()
    ours = {id(m) for m in model.modules()}
    get = object.__getattribute__
    wrapped: list = []  # (class, its own __getattribute__ and __setattr__ or _MISSING), in the order wrapped
    derived: set = set()  # (id(object), name) the trace set before reading: state it computes, not an input

    def seen(obj, name: str, value) -> None:
        """A public read of ``obj``'s instance attribute ``name`` (a module's or a followed object's)."""
        try:
            own = name in get(obj, "__dict__")
        except AttributeError:  # __slots__ only
            own = False
        follow = _followed(value)
        if own and (id(obj), name) not in derived and (follow or _plain(value) or isinstance(value, torch.Tensor)):
            guard.record(obj, name, value)
        if follow:
            wrap(type(value))

    def wrap(cls: type) -> None:
        if any(entry[0] is cls for entry in wrapped):
            return
        own, original = cls.__dict__.get("__getattribute__", _MISSING), cls.__getattribute__
        own_set, original_set = cls.__dict__.get("__setattr__", _MISSING), cls.__setattr__

        def getattribute(self, name):
            value = original(self, name)
            if not name.startswith("__") and threading.get_ident() == owner:  # _private too: a property's
                seen(self, name, value)  # value lives there (counters the trace moves are left out)
            return value

        def setattribute(self, name, value):  # set before read (a scheduler's set_timesteps in forward):
            if threading.get_ident() == owner and (id(self), name) not in guard._seen:  # derived, not read
                derived.add((id(self), name))
            return original_set(self, name, value)

        try:
            cls.__getattribute__ = getattribute
        except TypeError:  # a built-in or extension type
            return
        cls.__setattr__ = setattribute
        wrapped.append((cls, own, own_set))

    def getattribute(self, name):
        value = get(self, name)
        if name[:1] != "_" and name != "training" and threading.get_ident() == owner and id(self) in ours:
            seen(self, name, value)
        return value

    setattr_ = torch.nn.Module.__setattr__

    def setattribute(self, name, value):
        if threading.get_ident() == owner and not name.startswith("_") and name != "training" and id(self) in ours:
            what = f"{type(self).__name__}.{name}"
            if what not in guard.writes:
                guard.writes.append(what)
            guard._before.setdefault((id(self), name), (self, name, get(self, "__dict__").get(name, _MISSING)))
        return setattr_(self, name, value)

    _record_globals(guard, model)
    torch.nn.Module.__getattribute__ = getattribute
    torch.nn.Module.__setattr__ = setattribute
    try:
        yield guard
    finally:
        del torch.nn.Module.__getattribute__
        torch.nn.Module.__setattr__ = setattr_
        for cls, own, own_set in reversed(wrapped):
            for name, value in (("__getattribute__", own), ("__setattr__", own_set)):
                if value is _MISSING:
                    delattr(cls, name)
                else:
                    setattr(cls, name, value)
        guard.note_global_writes()
