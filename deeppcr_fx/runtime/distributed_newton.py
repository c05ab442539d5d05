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
Failures too: if the step (or its derivative) raises on one rank, that rank still takes part in
the iteration's next exchange with a flag set, and then every rank raises there (the failing
rank its own exception, the others ``PeerFailure``), so no rank is left waiting.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ..results import FinishCause
from .distributed_comm import Comm, DistributedSolveError, raise_failures
from .distributed_scan import cross_rank_scan
from .newton import scaled_norm
from .stats import PassStats

_NON_FINITE, _FAILED = 1.0, 2.0  # the check's flag: a residual is NaN/Inf; the step raised on that rank

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
        summary = torch.zeros(3, dtype=torch.float64, device=U.device)  # first unconverged, worst, flag
        summary[0] = total
        failure = None
        try:
            vals, jac = evaluate(w0, U)
            residual = vals - U[w0:]
            if residual.shape[0]:
                ratio = scaled_norm(residual, U[w0:], atol, rtol)
                worst = float(ratio.max())
                if not math.isfinite(worst):
                    summary[2] = _NON_FINITE
                else:
                    summary[1] = worst
                    bad = (ratio > 1).nonzero()
                    if bad.numel():
                        summary[0] = lo + w0 + int(bad[0])
        except DistributedSolveError:  # a collective inside evaluate failed: the group is broken
            raise
        except Exception as exc:  # the step raised here: every rank stops at the check below
            failure, summary[2] = exc, _FAILED
        gathered = comm.gather(summary, f"{what} convergence check").cpu()
        raise_failures(comm, (gathered[:, 2] == _FAILED).tolist(), failure, f"the {what} step evaluation")
        if bool((gathered[:, 2] == _NON_FINITE).any()):
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
        try:
            A, E = jac() if (w1 < m and mode != "zero") else (None, None)
        except DistributedSolveError:
            raise
        except Exception as exc:  # forming the Jacobians raised: the scan's exchange carries the flag
            failure, A, E = exc, None, None
        r = residual[skip:]
        delta = cross_rank_scan(comm, pos, order, None if A is None else A[skip:], r, E, mode,
                                U[0], f"{what} scan", failure)
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
    incoming, failure = None, None
    for q in range(first, len(order)):
        out = None
        if q == pos:
            try:
                out = finish(min(max(g - lo, 0), m), U, incoming)
            except DistributedSolveError:
                raise
            except Exception as exc:  # the others learn it from the flag (broadcast, or the gather below)
                failure = exc
        if q == len(order) - 1:
            break
        buf = U.new_zeros(U[0].numel() + 1)  # the boundary value and a failure flag
        if q == pos:
            if failure is None:
                buf[:-1] = out.reshape(-1)
            else:
                buf[-1] = 1
        comm.broadcast(buf, order[q], f"{what} sequential finish")
        raise_failures(comm, [bool(buf[-1] > 0) if r == order[q] else False for r in range(comm.size)],
                       failure, f"the {what} sequential finish")
        if q + 1 == pos:
            incoming = buf[:-1].view_as(U[0])
    flags = comm.gather(U.new_tensor([0.0 if failure is None else 1.0]), f"{what} sequential finish")
    raise_failures(comm, (flags[:, 0] > 0).tolist(), failure, f"the {what} sequential finish")
    return U
