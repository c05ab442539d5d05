"""Parallel Cyclic Reduction (PCR) for the affine recurrence of one Newton step.

Summary of the algorithm. Solve, for rows l = 0..L-1 with delta_{-1} = 0,

    delta_l = A_l delta_{l-1} + r_l

At stride s = 1, 2, 4, ... every row l >= s substitutes the equation of row l - s:

    r_l <- r_l + A_l r_{l-s};   A_l <- A_l A_{l-s}      (rows l < s are final)

After ceil(log2 L) rounds every row reads delta_l = r_l. Row 0's A is never used (its
predecessor is the zero vector), so callers may pass anything there.

``A`` takes one of four structures, the Jacobian mode's (``runtime/modes.py``, which owns the products):

    full      A: (L, B, n, n)   dense per-sample matrices      O(L B n^3) a round
    diag      A: (L, B, n)      diagonal                        O(L B n)   a round
    identity  A = I  (None)     the recurrence is a cumulative sum (``Mode.closed_scan``)
    zero      A = 0  (None)     delta = r, no scan

Work-efficient variant (``chunk=K``): sequential inside chunks of K rows, PCR across the
chunks. Each chunk first solves its rows as if the row before it were zero and keeps the
running products P_k = A_k ... A_first; the chunks' last rows then form a recurrence of
length L/K (solved by PCR), and one batched product adds P_k times the previous chunk's
carry to every row. It does O(L) matrix work instead of O(L log L) in about 3K + 2 log2(L/K)
tensor operations: fewer, cheaper operations on CPUs with few cores; plain PCR (fewer,
wider operations) on GPUs. ``chunk=None`` chooses (see ``default_chunk``).

``transpose=True`` solves the adjoint recurrence of the backward pass, which runs from the
last row to the first with transposed matrices:

    a_l = A_{l+1}^T a_{l+1} + r_l,   a_{L} = 0 beyond the end

Inputs are not modified.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch

from ..results import InvalidInput
from .modes import Mode, mode_of


def rounds(length: int) -> int:
    """Number of PCR rounds for ``length`` rows: ceil(log2 L)."""
    return max(0, (length - 1).bit_length())


# The chunking rule, in one place: the runtime (``default_chunk``) and the compiler's cost model
# (``passes/cost_model.py``, which builds a sympy expression from ``chunk_formula``) both read it.
CHUNK_MIN_LENGTH = 128  # CPU chains at least this long use the chunked scan
CHUNK_MIN, CHUNK_MAX = 8, 32  # K = round(sqrt(L / 2)) clamped to this range


def chunked(length: int, device_type: str) -> bool:
    """Whether ``default_chunk`` chunks a chain of ``length`` rows on a device of ``device_type``."""
    return device_type == "cpu" and length >= CHUNK_MIN_LENGTH


def chunk_formula(length, sqrt: Callable = math.sqrt, floor: Callable = math.floor,
                  minimum: Callable = min, maximum: Callable = max):
    """K = round(sqrt(L / 2)) clamped to [CHUNK_MIN, CHUNK_MAX], written once for numbers and symbols.

    Arguments:
        length: L, a number (the runtime) or a sympy expression (the cost model).
        sqrt, floor, minimum, maximum: the functions to build it with (``math``'s and the
            builtins by default; ``sympy.sqrt``, ``sympy.floor``, ``sympy.Min``, ``sympy.Max``
            for an expression).

    Returns:
        K as ``floor((sqrt(2 L) + 1) / 2)`` clamped (round half up, exact in sympy).
    """
    return minimum(CHUNK_MAX, maximum(CHUNK_MIN, floor((sqrt(2 * length) + 1) / 2)))


def default_chunk(length: int, device: torch.device) -> int:
    """Chunk size for the work-efficient scan: none (0, plain PCR) on accelerators and short chains.

    Arguments:
        length: L, the number of rows.
        device: where the scan runs.

    Returns:
        ``chunk_formula(L)`` where ``chunked(L, device.type)``, else 0.
    """
    if not chunked(length, device.type):
        return 0
    return int(chunk_formula(length))


def affine_scan(A: Optional[torch.Tensor], r: torch.Tensor, mode: Union[Mode, str], transpose: bool = False,
                chunk: Optional[int] = None) -> torch.Tensor:
    """Solve ``delta_l = A_l delta_{l-1} + r_l`` (or its adjoint) for all rows.

    Arguments:
        A: the matrices in ``mode``'s structure: (L, B, n, n) for ``full``, (L, B, n) for ``diag``,
            None for ``identity`` and ``zero``. Row 0 is never read.
        r: the right-hand sides, (L, B, n).
        mode: a ``modes.Mode`` or its name (see the module docstring).
        transpose: solve the adjoint recurrence ``a_l = A_{l+1}^T a_{l+1} + r_l`` instead (backward pass).
        chunk: rows per chunk of the work-efficient variant; 0 or 1 for plain PCR; None chooses
            (``default_chunk``).

    Returns:
        ``delta`` (or ``a``), shaped like ``r``. ``A`` and ``r`` are not modified.
    """
    mode = mode_of(mode)
    if not mode.linearised:
        return mode.closed_scan(r, transpose)
    if transpose:
        A, r = reversed_system(A, r, mode)
        return _forward_scan(A, r, mode, chunk).flip(0)
    return _forward_scan(A, r, mode, chunk)


def reversed_system(A: Optional[torch.Tensor], r: torch.Tensor, mode: Mode) -> tuple:
    """The adjoint recurrence ``a_l = A_{l+1}^T a_{l+1} + r_l`` as a forward one: rows reversed, A
    transposed (``mode.transpose``) and shifted by one so row l pairs with A_{l+1}^T; the result comes
    back reversed (``.flip(0)``)."""
    r = r.flip(0)
    if A is not None:
        A = mode.transpose(A.flip(0))
        A = torch.cat([A[-1:], A[:-1]])  # row 0 of the reversed system is unused
    return A, r


def _forward_scan(A: torch.Tensor, r: torch.Tensor, mode: Mode, chunk: Optional[int]) -> torch.Tensor:
    if A is None or A.shape[0] != r.shape[0]:
        raise InvalidInput(f"A must have one entry per row: got {None if A is None else tuple(A.shape)} for r {tuple(r.shape)}")
    chunk = default_chunk(r.shape[0], r.device) if chunk is None else chunk
    if 1 < chunk < r.shape[0]:
        return _chunked_scan(A, r, mode, chunk)
    return _pcr(A.clone(), r.clone(), mode)


def sweep_chunks(A: torch.Tensor, r: torch.Tensor, mode: Mode) -> torch.Tensor:
    """Every chunk at once, its rows as if the row before it were zero: ``r[k] += A[k] r[k-1]`` in place
    along dim 0 (chunk rows; dim 1 runs over chunks and samples; ``r`` in ``mode.columns`` form).
    Returns the running products ``P[k] = A[k] ... A[0]``."""
    P = torch.empty_like(A)
    P[0] = A[0]
    rs, As, Ps = r.unbind(0), A.unbind(0), P.unbind(0)  # row views made once, not 5 per loop turn
    for k in range(1, A.shape[0]):
        mode.apply_add_(rs[k], As[k], rs[k - 1])
        mode.compose_into(As[k], Ps[k - 1], Ps[k])
    return P


def _chunked_scan(A: torch.Tensor, r: torch.Tensor, mode: Mode, chunk: int) -> torch.Tensor:
    length, tail = r.shape[0], r.shape[1:]
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    if pad:  # trailing rows with r = 0 do not change the rows before them
        r = torch.cat([r, r.new_zeros(pad, *tail)])
        A = torch.cat([A, A.new_zeros(pad, *A.shape[1:])])
    # Layout (chunk position k, chunk c * batch, ...): every A[k], r[k] below is one contiguous block,
    # and the in-place batched kernels (baddbmm_, bmm out=, addcmul_) need no temporaries.
    n = r.shape[-1]
    mat = A.shape[-mode.matrix_dims:]
    A = A.reshape(n_chunks, chunk, -1, *mat).transpose(0, 1)
    A = A.reshape(chunk, -1, *A.shape[3:]).contiguous()  # (K, C*B', n, n) or (K, C*B', n)
    r = r.reshape(n_chunks, chunk, -1, n).transpose(0, 1).reshape(chunk, -1, n).contiguous()
    r = mode.columns(r)  # column vectors for baddbmm (full)
    P = sweep_chunks(A, r, mode)
    # the chunks' last rows: D_c = r_c,last + P_c,last D_{c-1}; chunk 0's P multiplies the zero vector
    per_chunk = (n_chunks, -1, n) + mat[1:]
    last_r = r[-1].reshape(n_chunks, -1, n)
    carry = _pcr(P[-1].reshape(per_chunk).clone(), last_r.clone(), mode)  # (C, B', n)
    # every row of chunk c >= 1 adds P (its running product) times the carry D_{c-1}
    later_r = r.view(chunk, n_chunks, -1, *r.shape[2:])[:, 1:]
    later_P = P.view(chunk, n_chunks, -1, *P.shape[2:])[:, 1:]
    mode.add_applied_(later_r, later_P, carry[:-1])
    r = mode.vectors(r)
    r = r.reshape(chunk, n_chunks, *tail).transpose(0, 1).reshape(n_chunks * chunk, *tail)
    return r[:length]


def _pcr(A: torch.Tensor, r: torch.Tensor, mode: Mode) -> torch.Tensor:
    """Plain PCR, in place on ``A`` and ``r`` (callers pass copies)."""
    length = r.shape[0]
    n_rounds = rounds(length)
    for k in range(n_rounds):
        s, last = 1 << k, k == n_rounds - 1
        r[s:] += mode.apply(A[s:], r[:-s])
        if not last:
            A[s:] = mode.compose(A[s:], A[:-s])
    return r
