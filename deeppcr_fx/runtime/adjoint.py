"""The backward pass of a chain: the linear adjoint, solved in parallel.

With states z_0..z_{L-1} (state k = f_k(state k-1), state -1 = x0), Jacobians
J_k = d z_k / d z_{k-1} and incoming gradients G_k = dLoss/dz_k, the adjoint is

    a_{L-1} = G_{L-1},     a_k = G_k + J_{k+1}^T a_{k+1}

and every input gradient follows from ONE batched VJP over all steps with cotangent a:

    pullback(a) = (J_k^T a_k for each k  -> row 0 is dLoss/dx0,
                   dLoss/d(per-step inputs of step k),  sum over k of dLoss/d(shared))

How a is found depends on the Jacobian mode (``modes.Mode``; each way is exact):
- an exact mode (full): J_k (replicated batch, or the state's pullback vmapped over n cotangents), then one
  reverse PCR. The final pullback checks the adjoint equations for free; where they fail (the
  per-sample J is approximate when a step couples samples) the adjoint is iterated as below,
  with J as the preconditioner.
- the approximate modes (diag, identity, zero): the adjoint is solved by ``triangular_newton`` in reversed row
  order. Each iteration computes the exact products J_{k+1}^T a_{k+1} for all k with one
  batched VJP; the mode's approximate Jacobian only preconditions the correction. Like the
  forward solve it ends in at most L iterations, or finishes sequentially with per-step VJPs.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch.func import vjp

from . import jacobians
from .modes import Mode
from .newton import scaled_norm, triangular_newton
from .scan import affine_scan
from .stats import PassStats
from .steps import Steps


def step_functions(steps: Steps, Zprev: torch.Tensor, wrt: Sequence[int]) -> tuple:
    """``(g, inputs, state_pullback)`` for the adjoint of all of ``steps`` at ``Zprev``: ``g(Z, *diff)``
    evaluates them with the inputs ``wrt`` replaced by ``diff`` (for the parameter pullback),
    ``inputs`` are ``steps.inputs``, and ``state_pullback(c)`` is ``J^T c``. Products J^T c (n of them
    for the Jacobians, one per adjoint iteration) need only the state's pullback, made on first use:
    the inputs' gradients are formed once, by the full pullback at the end."""
    f = steps.batched_with_params(0, Zprev.shape[0])
    inputs = list(steps.inputs)

    g = with_replaced(f, inputs, wrt)

    state_vjp = None

    def state_pullback(c):
        nonlocal state_vjp
        if state_vjp is None:
            state_vjp = vjp(lambda Z: f(Z, *inputs), Zprev)[1]
        return state_vjp(c)[0]

    return g, inputs, state_pullback


def adjoint(steps: Steps, Zprev: torch.Tensor, G: torch.Tensor, wrt: Sequence[int],
            mode: Mode, atol: float, rtol: float, max_iter: int, stats: PassStats,
            replicated: Optional[Steps] = None, replicate_quietly: bool = True) -> tuple:
    """Gradients w.r.t. ``Zprev`` and the inputs ``steps.inputs[i] for i in wrt``, given ``G`` (L, B, n).

    ``atol``, ``rtol``: the adjoint's tolerances (``Config.adjoint_tolerances``), relative to the
    cotangents' magnitudes, so a loss scaled by 1e-8 gets the same relative accuracy as one of 1.

    ``replicated``: the steps on a replicated batch, to form full Jacobians by
    ``jacobians.jacobian_replicated`` (else the state's pullback is vmapped over cotangents).
    Returns ``(dZprev, *dinputs)`` where ``dZprev[0]`` is the gradient w.r.t. x0.
    """
    g, inputs, state_pullback = step_functions(steps, Zprev, wrt)
    stats.jacobian = mode.name
    _, pullback = vjp(g, Zprev, *(inputs[i] for i in wrt))
    if not mode.exact:
        return pullback(_iterate(steps, state_pullback, Zprev, G, mode, atol, rtol, max_iter, stats))
    J = _exact_jacobian(state_pullback, Zprev, mode, replicated, replicate_quietly)
    a = affine_scan(J, G, mode, transpose=True)
    stats.iterations = 1
    grads = pullback(a)
    # The full pullback's state gradient holds the exact products J_k^T a_k, so checking the adjoint
    # equations costs nothing. They fail only where J is not the true Jacobian: samples coupled
    # within a step (a batch mean, attention across the batch) make the per-sample J approximate.
    # Then the adjoint is iterated with exact products, J only preconditioning it.
    if _adjoint_residual_ok(a, G, grads[0], atol, rtol):
        stats.converged = True
        return grads
    stats.iterations = 0
    return pullback(_iterate(steps, state_pullback, Zprev, G, mode, atol, rtol, max_iter, stats, J=J, initial=a))


def _adjoint_residual_ok(a: torch.Tensor, G: torch.Tensor, products: torch.Tensor, atol: float, rtol: float) -> bool:
    """Whether a_k = G_k + J_{k+1}^T a_{k+1} holds for every k, given ``products[k]`` = J_k^T a_k.

    Relative to the cotangents, per sample like the forward test (``newton.scaled_norm``), where the
    scale of ``a_k`` also counts ``|G_k| + |J_{k+1}^T a_{k+1}|`` (their round-off, where they cancel,
    is what the sum's is)."""
    rhs = G[:-1] + products[1:]
    scale = a[:-1].abs() + G[:-1].abs() + products[1:].abs()
    return bool((scaled_norm(a[:-1] - rhs, scale, atol, rtol) <= 1).all())


def _exact_jacobian(state_pullback, Zprev: torch.Tensor, mode: Mode, replicated: Optional[Steps],
                    quietly: bool) -> torch.Tensor:
    if replicated is not None:
        J, _ = jacobians.try_replicated(replicated.batched(0, Zprev.shape[0]), Zprev, mode, quietly)
        if J is not None:
            return J
    return jacobians.jacobian_from_pullback(state_pullback, Zprev, mode)


def _iterate(steps: Steps, state_pullback, Zprev, G, mode, atol, rtol, max_iter, stats,
             J: Optional[torch.Tensor] = None, initial: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Solve a = G + shift(J^T a) as a triangular system in reversed row order (row m = state L-1-m).

    ``J`` (an exact mode): approximate Jacobians to precondition with, else the mode forms its own (if
    it is linearised: diag); ``initial``: a first guess for a."""
    length = G.shape[0]
    G_rev = G.flip(0)
    A_rev = None
    if J is None and mode.linearised:
        J = jacobians.jacobian_from_pullback(state_pullback, Zprev, mode)
    if J is not None:
        A_rev = mode.transpose(torch.cat([J[:1], J.flip(0)[:-1]]))  # row m pairs with J_{L-m}^T; row 0 unused

    def evaluate(start: int, U: torch.Tensor):
        h = state_pullback(U.flip(0))  # h_k = J_k^T a_k
        shifted = torch.cat([torch.zeros_like(h[:1]), h.flip(0)[:-1]])  # row m: J_{L-m}^T a_{L-m}
        vals = G_rev[start:] + shifted[start:]
        return vals, lambda: None if A_rev is None else A_rev[start:]

    def finish(start: int, U: torch.Tensor) -> None:
        for m in range(start, length):
            k = length - m  # state index whose adjoint feeds row m
            if m == 0:
                U[0] = G_rev[0]
                continue
            _, pb = vjp(lambda z: steps.single(k, z), Zprev[k])
            U[m] = G_rev[m] + pb(U[m - 1])[0]

    U = torch.zeros_like(G_rev) if initial is None else initial.flip(0).clone()
    triangular_newton(evaluate, finish, U, mode, atol, rtol, max_iter, stats, record=True)
    return U.flip(0)


def with_replaced(f, inputs, wrt):
    """``g(Z, *diff)``: ``f(Z, *inputs)`` with the inputs at positions ``wrt`` replaced by ``diff`` (what the
    parameter pullback differentiates)."""
    def g(Z, *diff):
        args = list(inputs)
        for i, t in zip(wrt, diff):
            args[i] = t
        return f(Z, *args)
    return g
