"""Parallel Cyclic Reduction (PCR) for the affine recurrence of one Newton step.

Summary of the algorithm. Solve, for rows l = 0..L-1 with delta_{-1} = 0,

    delta_l = A_l delta_{l-1} + r_l

At stride s = 1, 2, 4, ... every row l >= s substitutes the equation of row l - s:

    r_l <- r_l + A_l r_{l-s};   A_l <- A_l A_{l-s}      (rows l < s are final)

After ceil(log2 L) rounds every row reads delta_l = r_l. Row 0's A is never used (its
predecessor is the zero vector), so callers may pass anything there.

``A`` takes one of four structures (``mode``):

    full      A: (L, B, n, n)   dense per-sample matrices      O(L B n^3) a round
    diag      A: (L, B, n)      diagonal                        O(L B n)   a round
    identity  A = I  (None)     the recurrence is a cumulative sum
    zero      A = 0  (None)     delta = r, no scan

``transpose=True`` solves the adjoint recurrence of the backward pass, which runs from the
last row to the first with transposed matrices:

    a_l = A_{l+1}^T a_{l+1} + r_l,   a_{L} = 0 beyond the end

Inputs are not modified.
"""
from __future__ import annotations

from typing import Optional

import torch


def rounds(length: int) -> int:
    """Number of PCR rounds for ``length`` rows: ceil(log2 L)."""
    return max(0, (length - 1).bit_length())


def affine_scan(A: Optional[torch.Tensor], r: torch.Tensor, mode: str, transpose: bool = False) -> torch.Tensor:
    """Solve ``delta_l = A_l delta_{l-1} + r_l`` (or its adjoint) for all rows; returns ``delta``."""
    if mode == "zero":
        return r.clone()
    if transpose:
        # Adjoint: reverse the rows and shift A by one so row l pairs with A_{l+1}^T.
        r = r.flip(0)
        if A is not None:
            A = A.flip(0)
            A = A.transpose(-1, -2) if mode == "full" else A
            A = torch.cat([A[-1:], A[:-1]])  # row 0 of the reversed system is unused
        return _forward_scan(A, r, mode).flip(0)
    return _forward_scan(A, r, mode)


def _forward_scan(A: Optional[torch.Tensor], r: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "identity":
        return r.cumsum(0)
    if mode not in ("full", "diag"):
        raise ValueError(f"unknown Jacobian mode {mode!r}")
    if A is None or A.shape[0] != r.shape[0]:
        raise ValueError(f"A must have one entry per row: got {None if A is None else tuple(A.shape)} for r {tuple(r.shape)}")
    length = r.shape[0]
    r = r.clone()
    A = A.clone()
    n_rounds = rounds(length)
    for k in range(n_rounds):
        s, last = 1 << k, k == n_rounds - 1
        if mode == "full":
            r[s:] += (A[s:] @ r[:-s].unsqueeze(-1)).squeeze(-1)
            if not last:
                A[s:] = A[s:] @ A[:-s]
        else:
            r[s:] += A[s:] * r[:-s]
            if not last:
                A[s:] = A[s:] * A[:-s]
    return r
