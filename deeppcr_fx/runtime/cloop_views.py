"""Tensors of the generated C++ loop (``cloop_codegen``) as strided views of C arrays, and the aten view ops
as maps from Refs to Refs: no code is emitted for a view, only a new (shape, strides, offset) on the same
pointer (negative strides for flip). A reshape that is not a view of its input asks the caller to copy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch


class Unsupported(Exception):
    """The graph holds something this generator does not translate (the message says what)."""


@dataclass(frozen=True)
class Ref:
    """A tensor of the generated code: ``buf`` (a C array or pointer) read at ``offset + sum i_d * strides[d]``;
    inputs of the step are not ``writable``."""
    buf: str
    dtype: torch.dtype
    shape: tuple
    strides: tuple
    offset: int = 0
    writable: bool = True

    def at(self, idx: list) -> str:
        """``buf[offset + sum idx_d * stride_d]`` for index expressions ``idx`` (broadcast from the right)."""
        idx = idx[len(idx) - len(self.shape):]
        terms = [str(self.offset)] if self.offset else []
        for i, n, s in zip(idx, self.shape, self.strides):
            if n != 1 and s != 0 and i != "0":
                terms.append(i if s == 1 else f"{i}*{s}")
        return f"{self.buf}[{' + '.join(terms) or '0'}]"

    def view(self, shape, strides, offset: Optional[int] = None) -> "Ref":
        return Ref(self.buf, self.dtype, tuple(shape), tuple(strides), self.offset if offset is None else offset,
                   self.writable)


def contiguous_strides(shape) -> tuple:
    out, s = [], 1
    for n in reversed(shape):
        out.append(s)
        s *= max(n, 1)
    return tuple(reversed(out))


def dim_of(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def elements(ref: Ref) -> set:
    """The buffer offsets ``ref`` covers (a step's arrays are small)."""
    out = {ref.offset}
    for n, s in zip(ref.shape, ref.strides):
        out = {o + i * s for o in out for i in range(n)}
    return out


VIEWS = {"view", "_unsafe_view", "reshape", "permute", "t", "transpose", "unsqueeze", "squeeze", "expand", "slice",
         "select", "split", "split_with_sizes", "unbind", "alias", "chunk", "rev", "flip", "diagonal"}


def view(base: str, target, args: list, kw: dict, copy: Callable[[Ref], Ref]):
    """The Ref(s) of aten view op ``base`` on ``args[0]``; ``copy(x)`` materialises x contiguously where a
    reshape is not a view of it."""
    x, rank = args[0], len(args[0].shape)
    if base in ("view", "_unsafe_view", "reshape"):
        return reshape(x, list(args[1]), copy)
    if base == "permute":
        dims = [dim_of(d, rank) for d in args[1]]
        return x.view([x.shape[d] for d in dims], [x.strides[d] for d in dims])
    if base in ("t", "transpose"):
        d0, d1 = (0, 1) if base == "t" else (dim_of(args[1], rank), dim_of(args[2], rank))
        if rank < 2:
            return x
        order = list(range(rank))
        order[d0], order[d1] = order[d1], order[d0]
        return x.view([x.shape[d] for d in order], [x.strides[d] for d in order])
    if base == "unsqueeze":
        d = dim_of(args[1], rank + 1)
        return x.view(x.shape[:d] + (1,) + x.shape[d:], x.strides[:d] + (0,) + x.strides[d:])
    if base == "squeeze":
        dims = range(rank) if len(args) == 1 else [args[1]] if isinstance(args[1], int) else args[1]
        drop = {dim_of(d, rank) for d in dims if x.shape[dim_of(d, rank)] == 1}
        keep = [d for d in range(rank) if d not in drop]
        return x.view([x.shape[d] for d in keep], [x.strides[d] for d in keep])
    if base == "expand":
        sizes = list(args[1])
        lead = len(sizes) - rank
        shape, strides = [], []
        for i, n in enumerate(sizes):
            old = x.shape[i - lead] if i >= lead else 1
            n = old if n == -1 else n
            shape.append(n)
            strides.append(x.strides[i - lead] if i >= lead and old == n else 0)
        return x.view(shape, strides)
    if base == "slice":
        dim, start, end, step = list(args[1:]) + [0, None, None, 1][len(args) - 1:]
        dim = dim_of(dim, rank)
        n = x.shape[dim]
        start, end, step = slice(start, end, step).indices(n)
        shape, strides = list(x.shape), list(x.strides)
        shape[dim] = max(0, (end - start + step - 1) // step)
        strides[dim] *= step
        return x.view(shape, strides, x.offset + start * x.strides[dim])
    if base == "select":
        dim = dim_of(args[1], rank)
        i = args[2] + x.shape[dim] if args[2] < 0 else args[2]
        return x.view(x.shape[:dim] + x.shape[dim + 1:], x.strides[:dim] + x.strides[dim + 1:],
                      x.offset + i * x.strides[dim])
    if base in ("split", "split_with_sizes", "chunk", "unbind"):
        if base == "unbind":
            dim = dim_of(args[1] if len(args) > 1 else kw.get("dim", 0), rank)
            return [view("select", None, [x, dim, i], {}, copy) for i in range(x.shape[dim])]
        dim = dim_of(args[2] if len(args) > 2 else kw.get("dim", 0), rank)
        n = x.shape[dim]
        if base == "split_with_sizes":
            sizes = list(args[1])
        else:
            size = args[1] if base == "split" else -(-n // args[1])
            sizes = [min(size, n - s) for s in range(0, n, size)] if size > 0 else [n]
        out, at = [], 0
        for s in sizes:
            out.append(view("slice", None, [x, dim, at, at + s], {}, copy))
            at += s
        return out
    if base == "alias":
        return x
    if base in ("rev", "flip"):  # negative strides from the last element
        dims = {dim_of(d, rank) for d in args[1]}
        offset = x.offset + sum((x.shape[d] - 1) * x.strides[d] for d in dims if x.shape[d] > 0)
        return x.view(x.shape, [-s if d in dims else s for d, s in enumerate(x.strides)], offset)
    if base == "diagonal":  # offset 0 only: the diagonal mode's A (rowloop.py)
        offset, d1, d2 = (list(args[1:]) + [0, 0, 1][len(args) - 1:])[:3]
        offset, d1, d2 = kw.get("offset", offset), kw.get("dim1", d1), kw.get("dim2", d2)
        d1, d2 = dim_of(d1, rank), dim_of(d2, rank)
        if offset != 0 or d1 == d2:
            raise Unsupported(f"{target} offset {offset}, dims {d1}, {d2}")
        keep = [d for d in range(rank) if d not in (d1, d2)]
        return x.view([x.shape[d] for d in keep] + [min(x.shape[d1], x.shape[d2])],
                      [x.strides[d] for d in keep] + [x.strides[d1] + x.strides[d2]])
    raise Unsupported(f"view {target}")

def reshape(x: Ref, shape: list, copy: Callable[[Ref], Ref]) -> Ref:
    numel = math.prod(x.shape)
    if -1 in shape:
        known = math.prod(n for n in shape if n != -1)
        shape[shape.index(-1)] = numel // known if known else 0
    strides = None if any(s < 0 for s in x.strides) else view_strides(x.shape, x.strides, shape)
    if strides is None:  # not expressible as a view of x: copy to a contiguous buffer first
        x = copy(x)
        strides = contiguous_strides(shape)
    return x.view(shape, strides)


def view_strides(old_shape, old_strides, shape) -> Optional[tuple]:
    """The strides of ``x.view(shape)`` (PyTorch's ``computeStride``), or None when it needs a copy."""
    if math.prod(old_shape) == 0:
        return contiguous_strides(shape)
    new = [0] * len(shape)
    view_d = len(shape) - 1
    chunk_base = old_strides[-1] if old_strides else 1
    tensor_numel, view_numel = 1, 1
    for d in range(len(old_shape) - 1, -1, -1):
        tensor_numel *= old_shape[d]
        if d == 0 or (old_shape[d - 1] != 1 and old_strides[d - 1] != tensor_numel * chunk_base):
            while view_d >= 0 and (view_numel < tensor_numel or shape[view_d] == 1):
                new[view_d] = view_numel * chunk_base
                view_numel *= shape[view_d]
                view_d -= 1
            if view_numel != tensor_numel:
                return None
            if d > 0:
                chunk_base = old_strides[d - 1]
                tensor_numel, view_numel = 1, 1
    if view_d != -1:
        return None
    return tuple(new)
