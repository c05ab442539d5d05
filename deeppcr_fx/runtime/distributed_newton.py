"""The Newton driver across ranks: ``newton.triangular_newton`` with global decisions, one exchange per iteration.

The rows 0..T-1 of a triangular system ``u_t = F_t(u_{t-1})`` are split over the ranks in a
*logical order* (rank order for the forward chain, reversed for the adjoint); this rank
holds rows ``offsets[pos]..offsets[pos+1]-1``. One iteration:

    vals, jac = evaluate(w0, U)        this rank's window rows (the forward's halo is already here)
    ratio     = |vals - U| / (atol + rtol |U|)  per row (``newton.scaled_norm``)
    j         = this rank's first row with ratio > COHERENT
    [speculative] first position: Jacobians and the local scan from j, its map is its last row;
                  middle positions: the maps of rows w0..j-1 and j..; the last position: nothing
    ONE all-gather: (flag, j, worst, last row, its value, maps) from every rank
    -> the same decision everywhere: g = first unconverged row of the chain, stop or update;
       each rank folds the maps of the ranks before it into its input and sweeps its window;
       the next rank's halo (the forward's state before its first row) follows from the same
       gathered numbers, computed identically on both sides, so no halo exchange is needed.

Rules as in ``newton.triangular_newton``: rows before g are final (ratio <= COHERENT for them and
every row before); converged when every row has ratio <= COHERENT (or <= 1 in an exact mode, ``full``);
right after a quadratic step (previous worst > 1/COHERENT) a converged ``full`` iteration with a
worst ratio above COHERENT still applies its update (Newton's remainder; here with the current
Jacobians, which the speculative exchange already carries).

Speculation: an iteration that will probably not converge (the previous worst ratio was above
1/COHERENT, or it is the first) forms its Jacobians and sends its maps before the decision ("fresh"):
one collective per iteration. A full-mode iteration that quadratic convergence predicts to end
(previous^3 / before^2 <= 1 for the last two worst ratios) sends maps made with the last update's
Jacobians instead ("last", no new Jacobians: what one process's remainder update uses). Otherwise
the check goes first ("check"). When the chain has not converged after a "check" or a "last"
exchange, a second exchange carries maps of fresh Jacobians. The plan reads only gathered numbers,
so every rank makes the same one, and each kind of update is the one a single process makes.

When ``max_iter`` is reached or a residual is not finite, the rest runs sequentially: the rank
holding row g finishes its rows and hands its boundary value to the next rank in logical order (a
broadcast), and so on: exact, never a wrong answer. Every decision comes from gathered values, so
all ranks take the same branch and meet at the same collectives, and the stats are the same on
every rank. Failures too: if the step (or its derivative) raises on one rank, that rank still
takes part in the iteration's exchange with a flag set, and then every rank raises there (the
failing rank its own exception, the others ``PeerFailure``), so no rank is left waiting. A
``setup_error`` (the first step failed its check on this rank) is carried by the first exchange
and raised as one ``DistributedSolveError`` naming every failing rank.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ..results import FinishCause
from .distributed_comm import Comm, DistributedSolveError, raise_failures
from .distributed_scan import Packing, apply, fold, local_maps
from .modes import Mode
from .newton import COHERENT, scaled_norm
from .scan import affine_scan
from .stats import PassStats

_NON_FINITE, _FAILED, _SETUP = 1.0, 2.0, 3.0  # the flag: a residual is NaN/Inf; the step raised; the setup check failed

# evaluate(w0, U) -> (vals of local rows w0.., jac) with jac() -> (A rows w0.., E); may hold collectives
# finish(w0, U, incoming) -> outgoing: overwrite local rows w0.. sequentially; incoming None on the
# rank where the finish starts (it knows its predecessor), else the previous rank's outgoing value
# handoff(h): the forward's halo (the state before this rank's first row), derived from the exchange


def distributed_newton(comm: Comm, order: list, offsets: list, evaluate: Callable, finish: Callable,
                       U: torch.Tensor, mode: Mode, atol: float, rtol: float, max_iter: int, stats: PassStats,
                       record: bool = True, on_iteration: Optional[Callable[[int, int, float], None]] = None,
                       what: str = "forward", handoff: Optional[Callable[[torch.Tensor], None]] = None,
                       setup_error: Optional[str] = None) -> torch.Tensor:
    """Solve in place this rank's rows ``U`` (m >= 1, B, n) of the distributed triangular system.

    ``handoff``: given, the rank after this one derives its halo from each exchange (this rank's
    last row is set to exactly that value), and this rank's is passed to ``handoff``."""
    P = len(order)
    pos = order.index(comm.rank)
    first, last = pos == 0, pos == P - 1
    lo, hi, total = offsets[pos], offsets[pos + 1], offsets[-1]
    m = hi - lo
    packing = Packing(mode, U[0], P)
    stats.jacobian = mode.name
    g, previous, before = 0, math.inf, math.inf  # the worst ratios of the last two iterations
    A_last, E_last, A_from = None, None, 0  # the Jacobians of the last update (rows A_from..)
    while True:
        w0 = min(max(g - lo, 0), m)
        if stats.iterations >= max_iter:
            return _finish(comm, order, offsets, finish, U, g, stats, FinishCause.MAX_ITER, what)
        # the plan: "fresh" maps before the decision, maps with the "last" update's Jacobians (a full-mode
        # iteration that will probably end with the remainder update), or the "check" first
        # (a global choice: it reads only gathered numbers; a rank whose rows are not all final holds A_last)
        if mode.exact and math.isfinite(before) and previous ** 3 <= before ** 2:
            plan = "last"  # quadratic convergence predicts a worst ratio <= 1 (previous^3 / before^2)
        elif previous > 1 / COHERENT and mode.couples:
            plan = "fresh"
        else:
            plan = "check"
        speculate = plan != "check"
        buf = packing.new()
        buf[1] = total
        failure, vals, residual, jac, A, E, delta = None, None, None, None, None, None, None
        j = m
        try:
            if setup_error is not None:
                buf[0] = _SETUP
            else:
                vals, jac = evaluate(w0, U)
                residual = vals - U[w0:]
                if residual.shape[0]:
                    ratio = scaled_norm(residual, U[w0:], atol, rtol)
                    bad = (ratio > COHERENT).to(torch.uint8)
                    # one host sync: the worst ratio, whether a row is unconverged, and the first such row
                    worst, any_bad, first_bad = torch.stack([ratio.max().double(), bad.max().double(),
                                                             bad.argmax().double()]).tolist()
                    if not math.isfinite(worst):
                        buf[0] = _NON_FINITE
                    else:
                        buf[2] = worst
                        if any_bad:
                            j = w0 + int(first_bad)
                            buf[1] = lo + j
                    packing.put(buf, packing.v_last, vals[-1])
                packing.put(buf, packing.u_last, U[-1])  # also when final: the next rank's halo stays this
                if speculate and buf[0] == 0 and w0 < m:
                    jac_now = jac if plan == "fresh" else (lambda: (A_last[w0 - A_from:], E_last))
                    A, E, delta = _maps(packing, buf, pos, P, jac_now, residual, w0, j, m, mode)
        except DistributedSolveError:  # a collective inside evaluate failed: the group is broken
            raise
        except Exception as exc:  # the step raised here: every rank stops at the check below
            failure, buf[0] = exc, _FAILED
        rows = comm.gather(buf, f"{what} iteration")
        decision = read_decision(comm, rows, setup_error, failure, what)
        if decision is None:
            return _finish(comm, order, offsets, finish, U, g, stats, FinishCause.NON_FINITE, what)
        g_new, worst = decision
        converged, remainder = record_iteration(stats, record, g, worst, previous, mode)
        if done(stats, converged, remainder, on_iteration, total, worst):
            return U
        # update the window g_new.. (g_new < total: some row has ratio > COHERENT)
        w1 = min(max(g_new - lo, 0), m)
        fresh = plan == "fresh" or not converged
        if (plan == "check" or not fresh) and not converged and mode.couples:
            # the check went first, or the last Jacobians were sent but the chain did not converge:
            # a second exchange carries the maps of this iteration's Jacobians
            speculate, delta, A = False, None, None
            buf = packing.new()
            try:
                if w1 < m:
                    A, E, delta = _maps(packing, buf, pos, P, jac, residual, w0, w1, m, mode)
            except DistributedSolveError:
                raise
            except Exception as exc:
                failure, buf[0] = exc, _FAILED
            rows = comm.gather(buf, f"{what} scan")
            raise_failures(comm, (rows[:, 0] == _FAILED).tolist(), failure, f"the {what} Jacobians")
        x_in, new_last = fold(packing, rows, order, offsets, g_new, decided=not speculate)
        if w1 < m:
            if delta is None:
                delta = _sweep(residual, A, w0, w1, x_in[pos], mode)
            U[w1:] += delta
            if lo <= g_new < hi:
                U[g_new - lo] = vals[g_new - lo - w0]
        if handoff is not None:
            if not last and g_new < hi:
                U[-1] = new_last[pos]
            if not first:
                handoff(new_last[pos - 1])
        if on_iteration is not None:
            on_iteration(stats.iterations, total if converged else g_new + 1, worst)
        if converged:
            stats.converged = True
            return U
        if fresh and mode.couples:
            A_last, E_last, A_from = A, E, w0
        previous, before = worst, previous
        g = g_new


def read_decision(comm: Comm, rows: torch.Tensor, setup_error: Optional[str], failure: Optional[BaseException],
                  what: str) -> Optional[tuple]:
    """The group's decision from the gathered exchange rows: ``(g_new, worst)`` (the first unconverged row,
    the worst ratio over the ranks), or None when some rank's residual is not finite. The one host sync of
    an iteration's decision; raises on every rank when a rank's setup check failed or its step raised."""
    head = rows[:, :3].tolist()  # per rank: flag, first unconverged row, worst ratio
    flags = [h[0] for h in head]
    if _SETUP in flags:
        _raise_setup(comm, setup_error)
    raise_failures(comm, [f == _FAILED for f in flags], failure, f"the {what} step evaluation")
    if _NON_FINITE in flags:
        return None
    return int(min(h[1] for h in head)), max(h[2] for h in head)


def record_iteration(stats: PassStats, record: bool, g: int, worst: float, previous: float, mode: Mode) -> tuple:
    """Count the iteration (and its window and worst ratio when ``record``); ``(converged, remainder)``:
    whether the group's rows are final, and whether a full-mode remainder update is still due (the rules
    of ``newton.triangular_newton``)."""
    stats.iterations += 1
    if record:
        stats.window_starts.append(g)
        stats.residuals.append(worst)
    converged = worst <= COHERENT or (mode.exact and worst <= 1)
    remainder = converged and worst > COHERENT and previous > 1 / COHERENT and stats.iterations > 1
    return converged, remainder


def done(stats: PassStats, converged: bool, remainder: bool, on_iteration: Optional[Callable], total: int,
         worst: float) -> bool:
    """Whether the solve ends here (converged, no remainder update due): then the last progress report is
    made and the stats marked converged."""
    if not converged or remainder:
        return False
    if on_iteration is not None:
        on_iteration(stats.iterations, total, worst)
    stats.converged = True
    return True


def _maps(packing: Packing, buf: torch.Tensor, pos: int, P: int, jac: Callable, residual: torch.Tensor, w0: int,
          j: int, m: int, mode: Mode) -> tuple:
    """This rank's Jacobians (rows w0..) and maps into ``buf``: ``(A, E, delta)``. Position 0 scans its rows
    from j now (its input is zero whatever the others hold; delta), the middle ones reduce the maps of
    rows w0..j-1 and j.., the last one only forms its Jacobians (so a failure is flagged in the exchange)."""
    if pos == 0 and j >= m:  # nothing of this rank moves
        return None, None, None
    A, E = jac() if mode.couples else (None, None)
    if pos == 0:
        delta = affine_scan(None if A is None else A[j - w0:], residual[j - w0:], mode)
        if P > 1:
            packing.put_maps(buf, (None, apply(E, delta[-1], mode)))
        return A, E, delta
    if pos < P - 1 and mode.couples:
        pre, post = local_maps(A, residual, E, mode, j - w0, residual[0])
        packing.put_maps(buf, post, pre)
    return A, E, None


def _sweep(residual: torch.Tensor, A: Optional[torch.Tensor], w0: int, w1: int, x_in: Optional[torch.Tensor],
           mode: Mode) -> torch.Tensor:
    """This rank's update of rows w1.. given what enters row w1 (None: zero)."""
    if not mode.couples:  # zero: delta = r, whatever enters
        return residual[w1 - w0:].clone()
    A = None if A is None else A[w1 - w0:]
    r = residual[w1 - w0:]
    if x_in is not None:
        r = r.clone()
        r[0] += apply(None if A is None else A[0], x_in, mode)
    return affine_scan(A, r, mode)


def _raise_setup(comm: Comm, error: Optional[str]) -> None:
    errors = comm.gather_objects(error, "first step check")
    bad = [(r, e) for r, e in enumerate(errors) if e is not None]
    lines = "; ".join(f"rank {r}: {e}" for r, e in bad)
    raise DistributedSolveError(f"deeppcr.solve(group=...) failed during the first step check on rank(s) "
                                f"{[r for r, _ in bad]} of {comm.size}: {lines}")


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
