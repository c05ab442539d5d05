"""Python attributes a trace read from the model's modules, and the guard that re-checks them.

Tracing turns ``self.temperature`` or ``range(self.num_steps)`` into constants of the emitted
graph: an assumption about the module's state. While a model is traced, every read of a plain
Python value (a number, string, ``None``, or a tuple of them) from a module's instance
``__dict__`` is recorded (in the tracing thread only; public names, not ``training``, which the
signature covers); ``AttributeGuard.holds()`` compares them with the values now, and a compiled
module whose guard fails specialises again. Attributes the forward *sets* (a call counter, a
cache) are Python side effects the emitted graph would not repeat: they are listed in
``AttributeGuard.writes``, and the compiled module then runs the model as written.

Cost per call: one C-level pass over the recorded reads (``map(getattr, ...)``), nothing for a
model whose forward reads no Python attributes of its modules (torch's Linear, Tanh, ... read
none; LayerNorm reads its ``eps`` and ``normalized_shape``).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch

_PLAIN = (int, float, bool, str, type(None))
_MISSING = object()


def _plain(value) -> bool:
    return isinstance(value, _PLAIN) or (isinstance(value, tuple) and all(isinstance(v, _PLAIN) for v in value))


class AttributeGuard:
    """The ``(module, name, value)`` reads of one trace; ``holds()`` says whether all still read the same."""

    def __init__(self) -> None:
        self._seen: dict = {}  # (id(module), name) -> (module, name, value)
        self.writes: list = []  # "Class.name" of attributes the capture *set*: Python side effects
        self._before: dict = {}  # (id(module), name) -> (module, name, value before the first write)

    def record(self, module: torch.nn.Module, name: str, value) -> None:
        self._seen.setdefault((id(module), name), (module, name, value))

    def freeze(self) -> "AttributeGuard":
        written = {w for w in self.writes}
        entries = [e for e in self._seen.values() if f"{type(e[0]).__name__}.{e[1]}" not in written]
        self.modules = [m for m, _, _ in entries]
        self.names = [n for _, n, _ in entries]
        self.values = [v for _, _, v in entries]
        return self

    def undo_writes(self) -> None:
        """Put back what the capture set (a symbolic trace is not a call of the model)."""
        for module, name, value in self._before.values():
            if value is not _MISSING:
                object.__setattr__(module, name, value)
            elif name in module.__dict__:
                object.__delattr__(module, name)

    def __len__(self) -> int:
        return len(getattr(self, "names", self._seen))

    def holds(self) -> bool:
        try:
            return list(map(getattr, self.modules, self.names)) == self.values
        except AttributeError:  # an attribute was deleted
            return False

    def changed(self) -> list:
        """``module.name`` of each read whose value differs now (for the log)."""
        out = []
        for m, n, v in zip(self.modules, self.names, self.values):
            if getattr(m, n, object()) != v:
                out.append(f"{type(m).__name__}.{n}")
        return out


@contextlib.contextmanager
def recording_reads(guard: AttributeGuard, model: torch.nn.Module) -> Iterator[AttributeGuard]:
    """Record, in this thread, every plain Python value read from (or set on) the instance ``__dict__``
    of one of ``model``'s modules."""
    owner = threading.get_ident()
    ours = {id(m) for m in model.modules()}
    get = object.__getattribute__

    def getattribute(self, name):
        value = get(self, name)
        if threading.get_ident() == owner and not name.startswith("_") and name != "training" and _plain(value) \
                and id(self) in ours and name in get(self, "__dict__"):
            guard.record(self, name, value)
        return value

    setattr_ = torch.nn.Module.__setattr__

    def setattribute(self, name, value):
        if threading.get_ident() == owner and not name.startswith("_") and name != "training" and id(self) in ours:
            what = f"{type(self).__name__}.{name}"
            if what not in guard.writes:
                guard.writes.append(what)
            guard._before.setdefault((id(self), name), (self, name, get(self, "__dict__").get(name, _MISSING)))
        return setattr_(self, name, value)

    torch.nn.Module.__getattribute__ = getattribute
    torch.nn.Module.__setattr__ = setattribute
    try:
        yield guard
    finally:
        del torch.nn.Module.__getattribute__
        torch.nn.Module.__setattr__ = setattr_
