"""The affine scan across ranks: each rank reduces its slice to one map, the group exchanges P maps.

Every rank holds consecutive rows of one recurrence (in *logical* order: rank order for the
forward solve, reversed for the adjoint):

    d_j = A_j d_{j-1} + r_j          j = 0..m-1 on this rank, d_{-1} = x_in (from the ranks before)
    y   = E d_{m-1}                  what this rank hands to the next one (E = I unless given)

1. Reduce (local, no communication): the rank's rows compose to one affine map
   ``y = A_r x_in + c_r`` with ``A_r = E A_{m-1} ... A_0`` and ``c_r`` = ``E d_{m-1}`` for
   ``x_in = 0``. A pairwise tree of the mode's products (``Mode.compose``, ``Mode.apply``): m - 1
   matrix products (``full``), products of diagonals (``diag``); or a sum (``identity``, where every
   A is I: ``Mode.closed_reduce``).
2. Exchange: one all-gather of the P maps: ``Mode.map_numel`` + B n elements per rank (B n^2 + B n
   ``full``, 2 B n ``diag``, B n ``identity``), plus one failure flag; nothing in ``zero`` mode
   (``Mode.couples`` is False), where d = r.
3. Prefix (local, P small products): x_in = fold of the maps of the ranks before this one.
4. Sweep (local): the slice's own scan with ``r_0 += A_0 x_in`` (``runtime.scan.affine_scan``).

Communication per scan: O(P B n^2), independent of the chain length. The adjoint's
transposed matrices are the callers' business: they pass A and E in logical order.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from .distributed_comm import Comm, DistributedSolveError, raise_failures
from .modes import Mode, mode_of
from .scan import affine_scan, default_chunk, sweep_chunks


def reduce_maps(A: Optional[torch.Tensor], r: torch.Tensor, mode: Union[Mode, str]) -> tuple:
    """Compose rows 0..m-1: ``x -> A_{m-1}(... (A_0 x + r_0) ...) + r_{m-1}`` as ``(A_tot, c_tot)``.

    ``A_tot`` is None where the mode holds no matrices (``identity``: it is I)."""
    mode = mode_of(mode)
    if not mode.linearised:
        return None, mode.closed_reduce(r)
    c = r
    while A.shape[0] > 1:
        odd = A.shape[0] % 2
        pairs = A.shape[0] - odd
        A_lo, A_hi = A[0:pairs:2], A[1:pairs:2]
        c_lo, c_hi = c[0:pairs:2], c[1:pairs:2]
        A_new = mode.compose(A_hi, A_lo)
        c_new = mode.apply(A_hi, c_lo) + c_hi
        if odd:
            A_new, c_new = torch.cat([A_new, A[-1:]]), torch.cat([c_new, c[-1:]])
        A, c = A_new, c_new
    return A[0], c[0]


def apply(A: Optional[torch.Tensor], x: torch.Tensor, mode: Union[Mode, str]) -> torch.Tensor:
    """``A x`` in the mode's structure (A None: identity)."""
    if A is None:
        return x
    return mode_of(mode).apply(A, x)


def _matmul(A: Optional[torch.Tensor], B: torch.Tensor, mode: Mode) -> torch.Tensor:
    if A is None:
        return B
    return mode.compose(A, B)


def _identity(like: torch.Tensor, mode: Mode) -> Optional[torch.Tensor]:
    return mode.unit(*like.shape, like)


class Packing:
    """One rank's row of the exchange: a flat float64 vector (float64 holds float32 maps and the
    integer fields exactly), the same layout on every rank:

        [flag, first unconverged row (global), worst ratio,
         last row before the update (S), the step's value for the last row (S),
         c_post (S), A_post, c_pre (S), A_pre]             S = B n; the A's only when P > 2

    ``post``: the map of the rows from this rank's first unconverged row to its end, with the
    hand-off matrix E applied; ``pre``: the rows from the window start up to that row. The first
    rank in logical order sends only c_post (its input is always zero), the last rank no maps
    (its output is nobody's input), so with P = 2 no matrix travels at all.
    """

    HEADER = 3

    def __init__(self, mode: Union[Mode, str], like: torch.Tensor, size: int) -> None:
        B, n = like.shape
        mode = mode_of(mode)
        self.mode, self.B, self.n, self.dtype, self.device = mode, B, n, like.dtype, like.device
        self.S = B * n
        self.with_A = size > 2  # middle positions exist: they send pre maps and matrices
        self.A_size = mode.map_numel(B, n) if self.with_A else 0
        S, A = self.S, self.A_size
        self.u_last, self.v_last, self.c_post = self.HEADER, self.HEADER + S, self.HEADER + 2 * S
        self.a_post = self.c_post + S
        self.c_pre = self.a_post + A
        self.a_pre = self.c_pre + S
        self.size = self.a_pre + A if self.with_A else self.c_pre

    def new(self) -> torch.Tensor:
        return torch.zeros(self.size, dtype=torch.float64, device=self.device)

    def put(self, buf: torch.Tensor, at: int, t: Optional[torch.Tensor]) -> None:
        if t is not None:
            buf[at:at + t.numel()] = t.reshape(-1)

    def vec(self, row: torch.Tensor, at: int) -> torch.Tensor:
        return row[at:at + self.S].to(self.dtype).view(self.B, self.n)

    def mat(self, row: torch.Tensor, at: int) -> Optional[torch.Tensor]:
        if not self.mode.linearised:  # identity: A is I
            return None
        if not self.A_size:
            raise AssertionError("a map's matrix was needed that no rank sends")
        return row[at:at + self.A_size].to(self.dtype).view(self.mode.map_shape(self.B, self.n))

    def put_maps(self, buf: torch.Tensor, post: Optional[tuple], pre: Optional[tuple] = None) -> None:
        """``post``/``pre``: (A or None, c) of the rank's rows (A None: identity, or not needed)."""
        if post is not None:
            self.put(buf, self.c_post, post[1])
            if self.A_size:
                self.put(buf, self.a_post, post[0] if post[0] is not None else _identity(post[1], self.mode))
        if self.with_A:
            if pre is None:
                pre = (None, torch.zeros(self.B, self.n, dtype=self.dtype, device=self.device))
            self.put(buf, self.c_pre, pre[1])
            if self.A_size:
                self.put(buf, self.a_pre, pre[0] if pre[0] is not None else _identity(pre[1], self.mode))


def local_maps(A: Optional[torch.Tensor], r: torch.Tensor, E: Optional[torch.Tensor], mode: Union[Mode, str], j: int,
               like: torch.Tensor) -> tuple:
    """``(pre, post)`` of rows 0..j-1 and j.. of (A, r) (middle ranks), post with E applied."""
    mode = mode_of(mode)
    if j > 0:
        pre = reduce_maps(None if A is None else A[:j], r[:j], mode)
    else:
        pre = (None, torch.zeros_like(like))
    if j < r.shape[0]:
        A_tot, c_tot = reduce_maps(None if A is None else A[j:], r[j:], mode)
    else:
        A_tot, c_tot = None, torch.zeros_like(like)
    if E is not None:
        A_tot = _matmul(E, A_tot, mode) if A_tot is not None else E
        c_tot = apply(E, c_tot, mode)
    return pre, (A_tot, c_tot)


def fold(packing: Packing, rows: torch.Tensor, order: list, offsets: list, g_new: int, decided: bool) -> tuple:
    """``(x_in, new_last)`` per logical position from the gathered rows (every rank computes the same).

    ``x_in[q]``: what enters position q's first window row (None: zero). ``new_last[q]``: q's last row
    after the update (its hand-off to q + 1 in the forward chain): unchanged when q is final, the
    step's value when it is the first unconverged row, else the old value plus q's output (the last
    position's is not computed). ``decided``: the rows carry the maps of the decided window only."""
    P, mode = len(order), packing.mode
    x, x_in, new_last = None, [], []
    for q in range(P):
        x_in.append(x)
        if q == P - 1:
            new_last.append(None)
            break
        hi = offsets[q + 1]
        row = rows[order[q]]
        u_last = packing.vec(row, packing.u_last)
        if g_new >= hi:  # every row of q is final
            x_out = None
        elif not mode.couples:  # zero: the row's update is its residual alone
            x_out = packing.vec(row, packing.v_last) - u_last
        else:
            if x is not None and not decided:  # q's whole slice moves: its pre map, then its post map
                x = apply(packing.mat(row, packing.a_pre), x, mode) + packing.vec(row, packing.c_pre)
            c = packing.vec(row, packing.c_post)
            x_out = c if x is None else apply(packing.mat(row, packing.a_post), x, mode) + c
        if x_out is None:
            new_last.append(u_last)
        elif g_new == hi - 1:
            new_last.append(packing.vec(row, packing.v_last))
        else:
            new_last.append(u_last + x_out)
        x = x_out
    return x_in, new_last


def cumulative_products(A: torch.Tensor, mode: Mode) -> torch.Tensor:
    """``Phi_l = A_l ... A_0`` for every row (PCR on the matrices alone, every round)."""
    A = A.clone()
    s = 1
    while s < A.shape[0]:
        A[s:] = _matmul(A[s:], A[:-s], mode)
        s *= 2
    return A


def scan_with_propagator(A: Optional[torch.Tensor], r: torch.Tensor, mode: Union[Mode, str]) -> tuple:
    """``(d, propagate, total)``: ``d`` solves the rows for a zero input, ``propagate(x)`` is ``Phi_l x``
    for every row (what an input x adds; ``Phi_l = A_l ... A_0``) and ``total`` is ``Phi_{m-1}``
    (None: identity). So a rank scans *before* it knows its input, and adds it after the exchange with
    two batched products. Chunked like ``scan.affine_scan`` (sequential inside chunks of K rows, PCR
    across them): the chunks' running products P, which that scan forms anyway, and their
    cumulative products Q across chunks give ``Phi = P_{c,k} Q_{c-1}``. ``mode`` holds matrices, or is
    ``identity`` (A = I: ``Phi = I``)."""
    mode = mode_of(mode)
    if not mode.couples:  # zero: cross_rank_scan needs no propagator (Phi = 0 is not "None: identity")
        raise ValueError(f"no propagator for Jacobian mode {mode.name!r}: its rows do not couple")
    if not mode.linearised:
        return mode.closed_scan(r), lambda x: x.expand_as(r), None
    m, tail = r.shape[0], r.shape[1:]
    chunk = default_chunk(m, r.device)
    if not 1 < chunk < m:
        Phi = cumulative_products(A, mode)
        return affine_scan(A, r, mode, chunk=0), lambda x: apply(Phi, x.unsqueeze(0), mode), Phi[-1]
    n = r.shape[-1]
    C = -(-m // chunk)
    pad = C * chunk - m
    if pad:
        r = torch.cat([r, r.new_zeros(pad, *tail)])
        A = torch.cat([A, A.new_zeros(pad, *A.shape[1:])])
    mat = A.shape[-mode.matrix_dims:]
    A = A.reshape(C, chunk, -1, *mat).transpose(0, 1).reshape(chunk, -1, *mat).contiguous()  # (K, C*B, ...)
    r = r.reshape(C, chunk, -1, n).transpose(0, 1).reshape(chunk, -1, n).contiguous()
    r = mode.columns(r)
    P = sweep_chunks(A, r, mode)
    P_last = P[-1].reshape(C, -1, *mat)
    carry = affine_scan(P_last, r[-1].reshape(C, -1, n), mode, chunk=0)  # each chunk's last row, zero input
    Q = cumulative_products(P_last, mode)  # Q_c = P_last,c ... P_last,0
    P5 = P.view(chunk, C, -1, *mat)
    later_r = r.view(chunk, C, -1, *r.shape[2:])[:, 1:]
    mode.add_applied_(later_r, P5[:, 1:], carry[:-1])
    r = mode.vectors(r)
    d = r.reshape(chunk, C, *tail).transpose(0, 1).reshape(C * chunk, *tail)[:m]
    c_last, k_last = (m - 1) // chunk, (m - 1) % chunk
    total = P5[k_last, c_last] if c_last == 0 else _matmul(P5[k_last, c_last], Q[c_last - 1], mode)

    def propagate(x: torch.Tensor) -> torch.Tensor:
        u = torch.cat([x.unsqueeze(0), apply(Q[:-1], x.unsqueeze(0), mode)])  # what enters chunk c
        add = apply(P5, u.unsqueeze(0), mode)  # (K, C, B, n)
        return add.transpose(0, 1).reshape(C * chunk, *tail)[:m]

    return d, propagate, total


def cross_rank_scan(comm: Comm, pos: int, order: list, A: Optional[torch.Tensor], r: torch.Tensor,
                    E: Optional[torch.Tensor], mode: Union[Mode, str], like: torch.Tensor, what: str,
                    failure: Optional[BaseException] = None) -> torch.Tensor:
    """Solve this rank's rows of the recurrence above (the whole slice; one exchange); every rank of
    the group must call it.

    ``pos``: this rank's place in the logical order ``order`` (a list of group ranks). ``A``, ``r``:
    this rank's rows (at least one). ``E``: the matrix applied to the rank's last row before handing
    it on (None: identity). ``like``: a (B, n) tensor for shapes, dtype and device. ``failure``: this
    rank could not form its A (the exchange carries a flag, and every rank raises). Every position
    scans its rows *before* the exchange (the first for its zero input: its map is its last row; the
    others with ``scan_with_propagator``, which also gives their map), and the later positions add
    their input after it with two batched products: the scans run in parallel. Returns ``d``."""
    mode = mode_of(mode)
    if not mode.couples:  # zero: nothing to exchange (and no A that could have failed)
        return r.clone()
    P = len(order)
    packing = Packing(mode, like, P)
    buf = packing.new()
    d, propagate = None, None
    if failure is not None:
        buf[0] = 1
    else:
        try:
            if pos == 0:
                d = affine_scan(A, r, mode)
                if P > 1:
                    packing.put_maps(buf, (None, apply(E, d[-1], mode)))
            else:
                d, propagate, total = scan_with_propagator(A, r, mode)
                if pos < P - 1:
                    c_tot = d[-1]
                    if E is not None:
                        total = _matmul(E, total, mode) if total is not None else E
                        c_tot = apply(E, c_tot, mode)
                    packing.put_maps(buf, (total, c_tot))
        except DistributedSolveError:
            raise
        except Exception as exc:
            failure, buf[0] = exc, 1
    rows = comm.gather(buf, what)  # (P, size), indexed by group rank
    raise_failures(comm, (rows[:, 0] > 0).tolist(), failure, what)
    if pos == 0:
        return d
    x_in, _ = _fold_inputs(packing, rows, order, mode)
    return d + propagate(x_in[pos])


def _fold_inputs(packing: Packing, rows: torch.Tensor, order: list, mode: Mode) -> tuple:
    """x_in per position when every position's whole slice moves (the adjoint's one-pass scan)."""
    x, x_in = None, []
    for q in range(len(order)):
        x_in.append(x)
        if q == len(order) - 1:
            break
        row = rows[order[q]]
        c = packing.vec(row, packing.c_post)
        x = c if x is None else apply(packing.mat(row, packing.a_post), x, mode) + c
    return x_in, None
