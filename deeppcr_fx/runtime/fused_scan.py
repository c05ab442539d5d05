"""The affine scan written for a compiler: out-of-place, static shapes, small-n products as broadcasts.

The same recurrence as ``scan.affine_scan`` (``delta_l = A_l delta_{l-1} + r_l``, row 0's A never
read; ``transpose=True`` for the adjoint ``a_l = A_{l+1}^T a_{l+1} + r_l``), for tracing
(``torch.fx.experimental.proxy_tensor.make_fx``) and compiling with inductor (``runtime/fused.py``):

- no in-place updates and no Python loop over rows: a recursion over halving levels (cyclic
  reduction, the default: O(L) work, 2 log2 L levels), a loop over PCR rounds (log2 L rounds of L
  rows each) or over the positions inside a chunk (K), each turn a few whole-tensor operations;
- ``A_l x`` and ``A_l A_m`` for small n as a broadcast multiply and a sum over the last axis
  (the mode's ``fused_apply`` and ``fused_compose``, ``runtime/modes.py``), which inductor fuses
  into one loop nest (a (L, B, n, n) bmm of 4 x 4 matrices is a library call per row block in
  eager PyTorch, the cost that dominated the eager runtime's profile).

Chunked (work-efficient) variant, ``chunk=K`` (Summary of algorithm): pad L to C*K rows, view as
(C, K, ...); sweep position k = 1..K-1 of every chunk at once as if the row before the chunk were
zero, keeping the running products P_k = A_k ... A_0 of the chunk; solve the chunks' last rows
(a recurrence of length C) by PCR; add P_k times the previous chunk's carry to every row. O(L) work
in about 2K + 2 log2(C) whole-tensor operations.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from . import cscan
from .modes import Mode, mode_of
from .scan import reversed_system, rounds


def pcr(A: torch.Tensor, r: torch.Tensor, mode: Mode) -> torch.Tensor:
    """Plain PCR along dim 0, out of place: ceil(log2 L) rounds (``mode.fused_apply``, ``mode.fused_compose``)."""
    n_rounds = rounds(r.shape[0])
    for k in range(n_rounds):
        s = 1 << k
        r = torch.cat([r[:s], r[s:] + mode.fused_apply(A[s:], r[:-s])])
        if k < n_rounds - 1:
            A = torch.cat([A[:s], mode.fused_compose(A[s:], A[:-s])])
    return r


def cyclic_reduction(A: torch.Tensor, r: torch.Tensor, mode: Mode) -> torch.Tensor:
    """Odd-even cyclic reduction along dim 0, out of place: O(L) work in 2 log2 L levels of shrinking
    whole-tensor operations (PCR does L log2 L). Pair each odd row with the even row before it
    (``A_{2i+1} A_{2i}``, ``r_{2i+1} + A_{2i+1} r_{2i}``), solve the odd rows (a system of half the
    length, the same way), then every even row from the odd row before it. Row 0's A is never read,
    on any level: its products only reach row 0 of the halved systems."""
    length = r.shape[0]
    if length == 1:
        return r
    half = length // 2
    A_odd, r_odd = A[1::2], r[1::2]
    r_half = r_odd + mode.fused_apply(A_odd, r[0:2 * half:2])
    A_half = mode.fused_compose(A_odd, A[0:2 * half:2]) if half > 1 else A_odd
    z_odd = cyclic_reduction(A_half, r_half, mode)
    A_even = A[2::2]  # rows 2, 4, ...: each reads the odd row before it
    z_even = torch.cat([r[:1], r[2::2] + mode.fused_apply(A_even, z_odd[:A_even.shape[0]])])
    paired = torch.stack([z_even[:half], z_odd], dim=1).reshape(2 * half, *r.shape[1:])
    return torch.cat([paired, z_even[half:]]) if length % 2 else paired


def chunked(A: torch.Tensor, r: torch.Tensor, mode: Mode, chunk: int) -> torch.Tensor:
    """The work-efficient scan (see the module docstring) with ``chunk`` rows per chunk."""
    return chunked_with_products(A, r, mode, chunk)[0]


def chunked_with_products(A: torch.Tensor, r: torch.Tensor, mode: Mode, chunk: int) -> tuple:
    """``chunked``'s rows and the running products inside the chunks it forms on the way: ``(d, prods)``,
    ``prods[k]`` of shape ``(n_chunks, ...)`` the product of a chunk's maps up to its row k (the layer-parallel
    scan reuses them to apply an input later)."""
    length = r.shape[0]
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    if pad:  # trailing rows with r = 0 do not change the rows before them
        r = torch.cat([r, r.new_zeros(pad, *r.shape[1:])])
        A = torch.cat([A, A.new_zeros(pad, *A.shape[1:])])
    A = A.reshape(n_chunks, chunk, *A.shape[1:])
    r = r.reshape(n_chunks, chunk, *r.shape[1:])
    rows, prods = [r[:, 0]], [A[:, 0]]
    for k in range(1, chunk):
        rows.append(r[:, k] + mode.fused_apply(A[:, k], rows[-1]))
        prods.append(mode.fused_compose(A[:, k], prods[-1]))
    carry = pcr(prods[-1], rows[-1], mode)  # (C, ...): the chunks' last rows, final
    # chunk c >= 1: row k adds P_k D_{c-1}; chunk 0 reads the zero vector
    incoming = torch.cat([torch.zeros_like(carry[:1]), carry[:-1]])
    out = torch.stack([row + mode.fused_apply(P, incoming) for row, P in zip(rows, prods)], dim=1)
    return out.reshape(n_chunks * chunk, *out.shape[2:])[:length], prods


def scan(A: Optional[torch.Tensor], r: torch.Tensor, mode: Union[Mode, str], transpose: bool = False,
         chunk: int = 0) -> torch.Tensor:
    """``scan.affine_scan`` for tracing, for a ``modes.Mode`` or its name; ``chunk`` > 1 uses the chunked
    scan, else cyclic reduction (on CPU as ``cscan``'s C++ kernel, one node of the traced graph)."""
    mode = mode_of(mode)
    if not mode.linearised:
        return mode.closed_scan(r, transpose, copy=False)
    if transpose:
        A, r = reversed_system(A, r, mode)
        return scan(A, r, mode, False, chunk).flip(0)
    if 1 < chunk < r.shape[0]:
        return chunked(A, r, mode, chunk)
    if cscan.ENABLED and cscan.supported(A, r, mode):
        return cscan.cyclic_reduction(A, r, mode)
    return cyclic_reduction(A, r, mode)
