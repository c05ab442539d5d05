"""The Newton driver: one loop for every triangular system the runtime solves.

Both the forward chain ``z_l = f(z_{l-1})`` and the backward adjoint are *triangular*
fixed-point systems ``u_l = F_l(u_{l-1})`` over rows l = 0..L-1. One iteration, for the
window of rows ``start..L-1`` (rows before ``start`` are final):

    vals_l = F_l(u_{l-1})          all window rows in one batched call (+ Jacobians A_l)
    r_l    = vals_l - u_l          the residual at the current iterate
    start  = first row with |r_l| > atol + rtol |u_l|     (rows before it are final)
    delta  = affine_scan(A, r)     PCR from ``start``: delta_l = A_l delta_{l-1} + r_l, delta_{start-1} = 0
    u     += delta                 row ``start`` is set to vals exactly: it is now final

A row becomes final once it and every row before it have a small *residual* (max norm over
samples and state): then its error is the sequential loop's propagation of residuals no
larger than the tolerance. (A small *update* would not do: with an approximate Jacobian
a row's update can be small while the row is still off by ``(J - A) delta_{l-1}``.)
Because ``delta_{start-1} = 0``, the first window row is exact after each update, so the
loop ends in at most L + 1 evaluations whatever the Jacobian approximation (Newton,
quasi-Newton, Picard and Jacobi alike). It stops earlier and hands the rest to ``finish``
(an exact sequential loop) when ``max_iter`` is reached or an iterate is NaN/Inf.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .scan import affine_scan
from ..results import FinishCause
from .stats import PassStats

# evaluate(start, U) -> (vals for rows start..L-1, jac) where jac() forms the Jacobians of those rows
# in the mode's structure (None for identity/zero) only when called
Evaluate = Callable[[int, torch.Tensor], "tuple[torch.Tensor, Callable[[], Optional[torch.Tensor]]]"]

# CONVERGED: a solve ends as soon as every residual meets the tolerance, without one more "polishing"
# Newton update. The result is then the sequential loop with a perturbation of at most
# atol + rtol |z| per step (float32: ~8 ulp, the size of re-evaluating a step with other kernels),
# and a polishing update would cost a whole iteration (Jacobians and a scan) for digits below that.
# finish(start, U): overwrite rows start..L-1 of U with the exact sequential values
Finish = Callable[[int, torch.Tensor], None]


def triangular_newton(evaluate: Evaluate, finish: Finish, U: torch.Tensor, mode: str,
                      atol: float, rtol: float, max_iter: int, stats: PassStats,
                      record: bool = True, on_iteration: Optional[Callable[[int, int, float], None]] = None,
                      start: int = 0) -> torch.Tensor:
    """Solve in place from the initial guess ``U`` (rows, B, n), whose rows before ``start`` are final; returns ``U``.

    ``on_iteration(iteration, final_rows, worst_residual)``, if given, is called after each iteration."""
    length = U.shape[0]
    stats.jacobian = mode
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
        unconverged = (ratio > 1).nonzero()
        if on_iteration is not None:
            on_iteration(stats.iterations, length if unconverged.numel() == 0 else start + int(unconverged[0]) + 1, worst)
        if unconverged.numel() == 0:  # every row is final (no polishing update: see CONVERGED)
            stats.converged = True
            return U
        skip = int(unconverged[0])
        A = jac()
        # A non-finite delta needs no check here: it only reaches unfrozen rows, and the next
        # iteration's residual sees it and finishes sequentially from the frozen prefix.
        delta = affine_scan(None if A is None else A[skip:], residual[skip:], mode)
        window = U[start + skip:]
        window += delta
        window[0] = vals[skip]
        start += skip


def scaled_norm(delta: torch.Tensor, u: torch.Tensor, atol: float, rtol: float) -> torch.Tensor:
    """Per row: max over samples and state of |delta| / (atol + rtol |u|)."""
    return (delta.abs() / (atol + rtol * u.abs())).flatten(1).amax(dim=1)


def _finish(finish: Finish, start: int, U: torch.Tensor, stats: PassStats, cause: FinishCause) -> torch.Tensor:
    stats.sequential_finish = cause
    stats.sequential_from = start
    finish(start, U)
    return U
