"""The Newton driver: one loop for every triangular system the runtime solves.

Both the forward chain ``z_l = f(z_{l-1})`` and the backward adjoint are *triangular*
fixed-point systems ``u_l = F_l(u_{l-1})`` over rows l = 0..L-1. One iteration, for the
window of rows ``start..L-1`` (rows before ``start`` are final):

    vals_l = F_l(u_{l-1})          all window rows in one batched call (+ Jacobians A_l)
    r_l    = vals_l - u_l          the residual at the current iterate
    start  = first row with ratio_l > COHERENT            (rows before it are final)
    delta  = affine_scan(A, r)     PCR from ``start``: delta_l = A_l delta_{l-1} + r_l, delta_{start-1} = 0
    u     += delta                 row ``start`` is set to vals exactly: it is now final

Tolerances are relative to the magnitudes involved (DESIGN invariant 7), normwise per sample b
(``scaled_norm``; ``||.||`` is the max norm over one sample's state at one row):

    ratio_l = max_b ||r_{l,b}|| / (atol + rtol ||u_{l,b}||)    (atol: only a floor, the dtype's tiny)
    a row becomes final when it and every row before it have  ratio <= COHERENT (0.3)
    converged:  every row has ratio <= 1 (an exact mode: full)  or  <= COHERENT (diag, identity, zero)

A final row keeps its residual for good and later rows inherit it through the chain, so the
error of row l is the chain's propagation of the final rows' residuals, as a sequential loop's is
of its round-off. The thresholds bound how those residuals add up over L steps (see COHERENT): at
most round-off-sized, randomly signed ones when every row passes together in full mode; a third of
the tolerance (float32: ~2.5 ulp) for rows that freeze while the iteration still moves, whose
residuals share a sign. (A small *update* would not do as a test: with an approximate Jacobian a
row's update can be small while the row is still off by ``(J - A) delta_{l-1}``.)
Because ``delta_{start-1} = 0``, the first window row is exact after each update, so the
loop ends in at most L + 1 evaluations whatever the Jacobian approximation (Newton,
quasi-Newton, Picard and Jacobi alike). It stops earlier and hands the rest to ``finish``
(an exact sequential loop) when ``max_iter`` is reached or an iterate is NaN/Inf.

``runtime/fused.py`` is the same algorithm (the same thresholds, windows and outcomes) as one compiled
function per iteration whose decisions stay on the device (``Config(backend="inductor")``).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ..results import FinishCause
from .modes import Mode
from .scan import affine_scan
from .stats import PassStats

# evaluate(start, U) -> (vals for rows start..L-1, jac) where jac() forms the Jacobians of those rows
# in the mode's structure (None for identity/zero) only when called
Evaluate = Callable[[int, torch.Tensor], "tuple[torch.Tensor, Callable[[], Optional[torch.Tensor]]]"]

# CONVERGED: a solve ends as soon as every row passes, without one more Newton iteration. The result
# is then the sequential loop with a perturbation of at most rtol per step relative to the state
# (float32: ~8 ulp, the size of re-evaluating a step with other kernels; see COHERENT for how they
# add up): another iteration (Jacobians and a scan) would buy digits below that. Only right after a
# quadratic step does full mode add a last update, with the Jacobians it has (see COHERENT).
# finish(start, U): overwrite rows start..L-1 of U with the exact sequential values
Finish = Callable[[int, torch.Tensor], None]

# Residuals that stay behind add up over the chain. Exact Newton (``full``) converges quadratically:
# when every row passes, its residuals are round-off-sized with random signs and add up like a
# sequential loop's (~sqrt(L)). But a row that becomes final while later rows still iterate, and every
# row of the approximate modes (which converge linearly), keeps a truncation error of the iteration,
# of one sign row after row on a smooth chain: such residuals add up coherently (~L) and grow with
# the chain. So rows become final only at COHERENT * tolerance (float32: ~2.5 ulp, still above
# round-off), and the approximate modes converge only when every row meets that. Full mode converges
# with every row at ratio <= 1: after an iteration that has stopped converging quadratically (the
# previous worst ratio <= 1 / COHERENT) its residuals are round-off, which another update would not
# shrink (a chain near the edge of chaos stays at 0.8 of the tolerance); right after a quadratic step
# (say 5e3 -> 0.8) they are Newton's remainder, all of one sign (27x the sequential loop's error on a
# contractive chain of 24 steps), and a last update with the previous Jacobians removes them.
COHERENT = 0.3


def triangular_newton(evaluate: Evaluate, finish: Finish, U: torch.Tensor, mode: Mode,
                      atol: float, rtol: float, max_iter: int, stats: PassStats,
                      record: bool = True, on_iteration: Optional[Callable[[int, int, float], None]] = None,
                      start: int = 0) -> torch.Tensor:
    """Solve in place from the initial guess ``U`` (rows, B, n), whose rows before ``start`` are final; returns ``U``.

    ``mode``: the Jacobian mode (``modes.Mode``) of what ``evaluate``'s ``jac`` forms.
    ``on_iteration(iteration, final_rows, worst_residual)``, if given, is called after each iteration."""
    length = U.shape[0]
    stats.jacobian = mode.name
    previous = math.inf  # the previous iteration's worst ratio
    A_last, A_from = None, start  # the latest Jacobians (rows A_from..L-1)
    while True:
        if stats.iterations >= max_iter:
            return _finish(finish, start, U, stats, FinishCause.MAX_ITER)
        vals, jac = evaluate(start, U)
        residual = vals - U[start:]
        ratio = scaled_norm(residual, U[start:], atol, rtol)  # NaN/Inf anywhere in a row propagates here
        worst = float(ratio.max())
        if not math.isfinite(worst):
            return _finish(finish, start, U, stats, FinishCause.NON_FINITE)
        stats.iterations += 1
        if record:
            stats.window_starts.append(start)
            stats.residuals.append(worst)
        if worst <= COHERENT or (mode.exact and worst <= 1):  # every row is final (see CONVERGED)
            if worst > COHERENT and previous > 1 / COHERENT and A_last is not None:
                # Newton's remainder after a quadratic step, of one sign: removed by one update with the
                # last iteration's Jacobians (a scan; no evaluation, no new Jacobians)
                U[start:] += affine_scan(A_last[start - A_from:], residual, mode)
                U[start] = vals[0]
            if on_iteration is not None:
                on_iteration(stats.iterations, length, worst)
            stats.converged = True
            return U
        skip = int((ratio > COHERENT).nonzero()[0])
        previous = worst
        if on_iteration is not None:
            on_iteration(stats.iterations, start + skip + 1, worst)
        A = jac()
        # A non-finite delta needs no check here: it only reaches unfrozen rows, and the next
        # iteration's residual sees it and finishes sequentially from the frozen prefix.
        delta = affine_scan(None if A is None else A[skip:], residual[skip:], mode)
        window = U[start + skip:]
        window += delta
        window[0] = vals[skip]
        A_last, A_from = A, start
        start += skip


# Within one sample the test is normwise: |r_i| <= atol + rtol max(|u_i|, FLOOR ||u_b||) with FLOOR = 1.
# An element far below its sample's largest carries round-off of the largest one's size, so a more
# elementwise test stalls on it: FLOOR = 0.5 took 15 iterations instead of 8 on a tanh MLP near the
# edge of chaos (L = 4096), 0.1 (the former atol = 1e-7 at unit scale, tighter) 38.
FLOOR = 1.0


def scaled_norm(delta: torch.Tensor, u: torch.Tensor, atol: float, rtol) -> torch.Tensor:
    """Per row (dim 0): max over samples (dim 1) and state of ``|delta| / (atol + rtol max(|u|, FLOOR ||u_b||))``.

    ``rtol``: a number, or a tensor broadcasting against (rows, samples). Relative to each sample's
    magnitude whatever its scale. ``0 / 0`` is 0 (a zero row meets any tolerance exactly); a finite
    residual never reads as non-finite."""
    mag = u.abs().flatten(2)
    floor = mag.amax(dim=2, keepdim=True).mul_(FLOOR)
    rtol = rtol[..., None] if isinstance(rtol, torch.Tensor) else rtol
    den = torch.maximum(mag, floor).mul_(rtol).add_(atol)
    num = delta.abs().flatten(2)
    ratio = (num / den).clamp_(max=torch.finfo(num.dtype).max)  # finite / tiny: large, not Inf
    ratio = torch.where(num.isfinite(), ratio, num * math.inf)  # a NaN or Inf residual stays non-finite
    ratio = torch.where(num == 0, torch.zeros_like(ratio), ratio)
    return ratio.flatten(1).amax(dim=1)


def _finish(finish: Finish, start: int, U: torch.Tensor, stats: PassStats, cause: FinishCause) -> torch.Tensor:
    stats.sequential_finish = cause
    stats.sequential_from = start
    finish(start, U)
    return U
