"""The affine scan across ranks: each rank reduces its slice to one map, the group exchanges P maps.

Every rank holds consecutive rows of one recurrence (in *logical* order: rank order for the
forward solve, reversed for the adjoint):

    d_j = A_j d_{j-1} + r_j          j = 0..m-1 on this rank, d_{-1} = x_in (from the ranks before)
    y   = E d_{m-1}                  what this rank hands to the next one (E = I unless given)

1. Reduce (local, no communication): the rank's rows compose to one affine map
   ``y = A_r x_in + c_r`` with ``A_r = E A_{m-1} ... A_0`` and ``c_r`` = ``E d_{m-1}`` for
   ``x_in = 0``. A pairwise tree: m - 1 matrix products (``full``), products of diagonals
   (``diag``), or a sum (``identity``, where every A is I).
2. Exchange: one all-gather of the P maps: B n^2 + B n elements per rank (``full``),
   2 B n (``diag``), B n (``identity``), plus one failure flag; nothing in ``zero`` mode, where d = r.
3. Prefix (local, P small products): x_in = fold of the maps of the ranks before this one.
4. Sweep (local): the slice's own scan with ``r_0 += A_0 x_in`` (``runtime.scan.affine_scan``).

Communication per scan: O(P B n^2), independent of the chain length. The adjoint's
transposed matrices are the callers' business: they pass A and E in logical order.
"""
from __future__ import annotations

from typing import Optional

import torch

from .distributed_comm import Comm, raise_failures
from .scan import affine_scan


def reduce_maps(A: Optional[torch.Tensor], r: torch.Tensor, mode: str) -> tuple:
    """Compose rows 0..m-1: ``x -> A_{m-1}(... (A_0 x + r_0) ...) + r_{m-1}`` as ``(A_tot, c_tot)``.

    ``A_tot`` is None in ``identity`` mode (it is I)."""
    if mode == "identity":
        return None, r.sum(0)
    if mode not in ("full", "diag"):
        raise ValueError(f"no map reduction for Jacobian mode {mode!r}")
    c = r
    while A.shape[0] > 1:
        odd = A.shape[0] % 2
        pairs = A.shape[0] - odd
        A_lo, A_hi = A[0:pairs:2], A[1:pairs:2]
        c_lo, c_hi = c[0:pairs:2], c[1:pairs:2]
        if mode == "full":
            A_new = A_hi @ A_lo
            c_new = (A_hi @ c_lo.unsqueeze(-1)).squeeze(-1) + c_hi
        else:
            A_new = A_hi * A_lo
            c_new = A_hi * c_lo + c_hi
        if odd:
            A_new, c_new = torch.cat([A_new, A[-1:]]), torch.cat([c_new, c[-1:]])
        A, c = A_new, c_new
    return A[0], c[0]


def apply(A: Optional[torch.Tensor], x: torch.Tensor, mode: str) -> torch.Tensor:
    """``A x`` in the mode's structure (A None: identity)."""
    if A is None:
        return x
    if mode == "full":
        return (A @ x.unsqueeze(-1)).squeeze(-1)
    return A * x


def _matmul(A: Optional[torch.Tensor], B: torch.Tensor, mode: str) -> torch.Tensor:
    if A is None:
        return B
    return A @ B if mode == "full" else A * B


def cross_rank_scan(comm: Comm, pos: int, order: list, A: Optional[torch.Tensor], r: torch.Tensor,
                    E: Optional[torch.Tensor], mode: str, like: torch.Tensor, what: str,
                    failure: Optional[BaseException] = None) -> torch.Tensor:
    """Solve this rank's rows of the recurrence above; every rank of the group must call it.

    ``pos``: this rank's place in the logical order ``order`` (a list of group ranks).
    ``A``, ``r``: this rank's rows (possibly none: then it only takes part in the exchange and
    hands on zero, which is right for rows that are already final). ``E``: the matrix applied to
    the rank's last row before handing it on (None: identity). ``like``: a (B, n) tensor for
    shapes, dtype and device. ``failure``: this rank could not form its A (the exchange carries a
    flag, and every rank raises). Returns ``d`` (this rank's rows)."""
    if mode == "zero":  # nothing to exchange (and no A that could have failed)
        return r.clone()
    B, n = like.shape
    full = mode == "full"
    m = r.shape[0]
    last = pos == len(order) - 1
    A_size = B * n * n if full else (B * n if mode == "diag" else 0)
    packed = like.new_zeros(A_size + B * n + 1)  # the last element: this rank failed
    if failure is not None:
        packed[-1] = 1
    elif m > 0 and not last:  # the last rank's map is nobody's input
        A_tot, c_tot = reduce_maps(A, r, mode)
        if E is not None:
            A_tot = _matmul(E, A_tot, mode) if A_tot is not None else E
            c_tot = apply(E, c_tot, mode)
        if A_size:
            packed[:A_size] = A_tot.reshape(-1)
        packed[A_size:-1] = c_tot.reshape(-1)
    maps = comm.gather(packed, what)  # (P, A_size + B n + 1), indexed by group rank
    raise_failures(comm, (maps[:, -1] > 0).tolist(), failure, what)
    if m == 0:
        return r.clone()
    x = like.new_zeros(B, n)
    for q in range(pos):
        row = maps[order[q]]
        A_q = row[:A_size].view(B, n, n) if full else (row[:A_size].view(B, n) if A_size else None)
        x = apply(A_q, x, mode) + row[A_size:-1].view(B, n)
    r = r.clone()
    r[0] += apply(None if A is None else A[0], x, mode)
    return affine_scan(A, r, mode)
