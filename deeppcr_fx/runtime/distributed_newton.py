"""The Newton driver across ranks: ``newton.triangular_newton`` with global decisions.

The rows 0..T-1 of a triangular system ``u_t = F_t(u_{t-1})`` are split over the ranks in a
*logical order* (rank order for the forward chain, reversed for the adjoint); this rank
holds rows ``offsets[pos]..offsets[pos+1]-1``. One iteration:

    vals, jac = evaluate(w0, U)        this rank's window rows (``evaluate`` exchanges the halo it needs)
    ratio     = |vals - U| / (atol + rtol |U|)  per row
    all-gather (first unconverged row, worst ratio, non-finite) -> the same decision everywhere
    delta     = cross-rank scan of (A, residual) from the first unconverged row g
    U += delta; row g = vals exactly (it is now final)

Rows before the global first unconverged row are final on every rank (the triangular
argument of ``newton.py`` holds for the whole chain: the first window row has an exact
predecessor). When ``max_iter`` is reached or a residual is not finite, the rest runs
sequentially: the rank holding row g finishes its rows and hands its boundary value to the
next rank in logical order (a broadcast), and so on: exact, never a wrong answer.

Every decision (stop, window, finish) comes from gathered values, so all ranks take the same
branch and meet at the same collectives; the stats are therefore the same on every rank.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ..results import FinishCause
from .distributed_comm import Comm
from .distributed_scan import cross_rank_scan
from .newton import scaled_norm
from .stats import PassStats

# evaluate(w0, U) -> (vals of local rows w0.., jac) with jac() -> (A rows w0.., E); collectives inside
# finish(w0, U, incoming) -> outgoing: overwrite local rows w0.. sequentially; incoming None on the
# rank where the finish starts (it knows its predecessor), else the previous rank's outgoing value


def distributed_newton(comm: Comm, order: list, offsets: list, evaluate: Callable, finish: Callable,
                       U: torch.Tensor, mode: str, atol: float, rtol: float, max_iter: int, stats: PassStats,
                       record: bool = True, on_iteration: Optional[Callable[[int, int, float], None]] = None,
                       what: str = "forward") -> torch.Tensor:
    """Solve in place this rank's rows ``U`` (m >= 1, B, n) of the distributed triangular system."""
    pos = order.index(comm.rank)
    lo, hi, total = offsets[pos], offsets[pos + 1], offsets[-1]
    m = hi - lo
    stats.jacobian = mode
    g = 0
    while True:
        w0 = min(max(g - lo, 0), m)
        if stats.iterations >= max_iter:
            return _finish(comm, order, offsets, finish, U, g, stats, FinishCause.MAX_ITER, what)
        vals, jac = evaluate(w0, U)
        residual = vals - U[w0:]
        summary = torch.zeros(3, dtype=torch.float64, device=U.device)
        summary[0] = total
        if residual.shape[0]:
            ratio = scaled_norm(residual, U[w0:], atol, rtol)
            worst = float(ratio.max())
            if not math.isfinite(worst):
                summary[2] = 1.0
            else:
                summary[1] = worst
                bad = (ratio > 1).nonzero()
                if bad.numel():
                    summary[0] = lo + w0 + int(bad[0])
        gathered = comm.gather(summary, f"{what} convergence check").cpu()
        if bool((gathered[:, 2] > 0).any()):
            return _finish(comm, order, offsets, finish, U, g, stats, FinishCause.NON_FINITE, what)
        worst = float(gathered[:, 1].max())
        g_new = int(gathered[:, 0].min())
        stats.iterations += 1
        if record:
            stats.window_starts.append(g)
            stats.residuals.append(worst)
        if on_iteration is not None:
            on_iteration(stats.iterations, total if g_new == total else g_new + 1, worst)
        if g_new == total:
            stats.converged = True
            return U
        w1 = min(max(g_new - lo, 0), m)
        skip = w1 - w0
        A, E = jac() if (w1 < m and mode != "zero") else (None, None)
        r = residual[skip:]
        delta = cross_rank_scan(comm, pos, order, None if A is None else A[skip:], r, E, mode,
                                U[0], f"{what} scan")
        if delta.shape[0]:
            U[w1:] += delta
        if lo <= g_new < hi:
            U[g_new - lo] = vals[g_new - lo - w0]
        g = g_new


def _finish(comm: Comm, order: list, offsets: list, finish: Callable, U: torch.Tensor, g: int,
            stats: PassStats, cause: FinishCause, what: str) -> torch.Tensor:
    """Rows g.. sequentially, rank after rank in logical order (each hands its boundary value on)."""
    stats.sequential_finish = cause
    stats.sequential_from = g
    pos = order.index(comm.rank)
    lo = offsets[pos]
    m = offsets[pos + 1] - lo
    first = max(q for q in range(len(order)) if offsets[q] <= g)
    incoming = None
    for q in range(first, len(order)):
        out = None
        if q == pos:
            out = finish(min(max(g - lo, 0), m), U, incoming)
        if q == len(order) - 1:
            break
        buf = out.contiguous() if q == pos else torch.empty_like(U[0])
        comm.broadcast(buf, order[q], f"{what} sequential finish")
        if q + 1 == pos:
            incoming = buf
    return U
