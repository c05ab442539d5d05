"""Inputs and outputs of any form, for graphs that take and return flat tensors.

A captured graph takes tensors and returns tensors. Models are called with keywords, Python
options and ``None``s (``model(input_ids=ids, attention_mask=mask, use_cache=False)``) and return
pytrees: tuples, dicts, dataclasses, a ``ModelOutput``, with objects inside them that torch's
pytree does not know (a transformers ``DynamicCache`` holding one key and one value tensor per
layer). Two small records translate:

- ``Inputs``: which of a call's arguments are graph inputs (tensors, positional then keyword, in
  the order of the call that was captured) and which are baked in (everything else; the per-call
  signature keys on their values, so a different value specialises again).
- ``Outputs``: the flat tensors a graph returns, and how to rebuild the model's output from
  them. A pytree leaf that is neither a tensor nor a constant is kept as a *skeleton*: a deep
  copy in which every tensor it holds is a numbered slot; rebuilding deep-copies the skeleton
  with the slots filled by the graph's tensors (``copy.deepcopy``'s memo), so each call returns
  a fresh object of the model's own class, as the model does.
"""
from __future__ import annotations

import copy
import types
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..results import RecordFailure

_CONSTANTS = (bool, int, float, str, complex, torch.dtype, torch.device, type(None))


@dataclass(frozen=True)
class Inputs:
    """Positions and names of the tensor arguments of a call: ``tensors(args, kwargs)`` picks them."""

    positions: tuple  # indices into args
    names: tuple  # keys of kwargs

    @classmethod
    def of(cls, args: tuple, kwargs: dict) -> "Inputs":
        return cls(tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor)),
                   tuple(k for k, v in kwargs.items() if isinstance(v, torch.Tensor)))

    def tensors(self, args: tuple, kwargs: dict) -> list:
        return [args[i] for i in self.positions] + [kwargs[k] for k in self.names]

    def labels(self) -> list:
        return [f"input_{i}" for i in self.positions] + [str(k) for k in self.names]


class _Slot:
    """Where the ``index``-th output tensor goes inside a skeleton."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __deepcopy__(self, memo):  # only reached when the slot was not filled: keep it
        return self


def _inner_tensors(obj: Any, found: list, seen: set) -> None:
    """The tensors an object holds (through attributes, lists, tuples, dicts), each once, in order."""
    if isinstance(obj, torch.Tensor):
        if id(obj) not in seen:
            seen.add(id(obj))
            found.append(obj)
        return
    if isinstance(obj, _CONSTANTS) or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.nn.Module):
        raise RecordFailure(f"the model's output holds a module ({type(obj).__name__}); outputs must hold tensors "
                            "and plain values")
    if isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            _inner_tensors(v, found, seen)
    elif isinstance(obj, dict):
        for v in obj.values():
            _inner_tensors(v, found, seen)
    elif isinstance(obj, (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType)):
        return
    else:
        for v in getattr(obj, "__dict__", {}).values():
            _inner_tensors(v, found, seen)


class Outputs:
    """How a model's output is rebuilt from the flat tensors a graph returns."""

    def __init__(self, out: Any) -> None:
        self.tensors: list = []  # the output's tensors, in the order the graph returns them
        self.single = isinstance(out, torch.Tensor)
        if self.single:
            self.tensors.append(out)
            return
        leaves, self.spec = tree_flatten(out)
        self.leaves: list = []  # per leaf: ("tensor", slot) | ("constant", value) | ("object", skeleton, slots)
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                self.leaves.append(("tensor", self._slot(leaf)))
            elif isinstance(leaf, _CONSTANTS):
                self.leaves.append(("constant", leaf))
            else:
                inner: list = []
                _inner_tensors(leaf, inner, set())
                slots = {id(t): _Slot(self._slot(t)) for t in inner}
                try:
                    skeleton = copy.deepcopy(leaf, memo=dict(slots))
                except Exception as exc:
                    raise RecordFailure(f"the model's output holds a {type(leaf).__name__} that cannot be copied "
                                        f"({type(exc).__name__}: {exc}); outputs must be pytrees of tensors") from exc
                self.leaves.append(("object", skeleton, tuple(slots.values())))

    def forget(self) -> "Outputs":
        """Drop the recorded run's tensors (only their number is needed to rebuild)."""
        self.tensors = [None] * len(self.tensors)
        return self

    def _slot(self, t: torch.Tensor) -> int:
        for i, known in enumerate(self.tensors):
            if known is t and t is not None:
                return i
        self.tensors.append(t)
        return len(self.tensors) - 1

    def rebuild(self, values: Any) -> Any:
        """The model's output with ``values`` (what the graph returned, in ``self.tensors`` order)."""
        if self.single:
            return values if isinstance(values, torch.Tensor) else values[0]
        values = list(values)
        leaves = []
        for leaf in self.leaves:
            if leaf[0] == "tensor":
                leaves.append(values[leaf[1]])
            elif leaf[0] == "constant":
                leaves.append(leaf[1])
            else:
                _, skeleton, slots = leaf
                leaves.append(copy.deepcopy(skeleton, memo={id(s): values[s.index] for s in slots}))
        return tree_unflatten(leaves, self.spec)

