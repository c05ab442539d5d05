"""The backward pass of a layer-parallel solve: the linear adjoint across ranks.

Same equations as ``adjoint.py`` (read it first): with this rank's states' predecessors
``Zprev`` (row 0 is the previous rank's last state, or x0 on the first rank) and incoming
gradients ``G``,

    a_k = G_k + J_{k+1}^T a_{k+1}        (the last row of the chain: a = G)

The recurrence runs from the last rank to the first, so the logical order is reversed: on
each rank, logical row j is state ``m-1-j``. Row j >= 1 pairs with J_{k+1}^T of this rank;
logical row 0 receives J_{s}^T a_{s} from the rank after this one (s its first state), which
that rank computes and hands on: its boundary matrix ``E`` is its own first J^T, and the
incoming vector enters row 0 unmultiplied (A_0 = I).

- an exact mode (``full``): one cross-rank reverse scan with the Jacobians (``distributed_scan``), one local
  pullback, and the adjoint equations checked for free on every row, including the rank
  boundaries (one small all-gather). Where they fail (samples coupled within a step), the
  adjoint is iterated as below with J as the preconditioner.
- the approximate modes (``diag`` / ``identity`` / ``zero``): ``distributed_newton`` in the reversed order with exact
  products J^T a from one batched pullback per iteration; the halo is the next rank's
  product for its first state.

Input gradients follow from this rank's pullback; the caller sums shared ones over ranks.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch.func import vjp

from . import jacobians
from .adjoint import step_functions
from .distributed_comm import Comm, DistributedSolveError, raise_failures
from .distributed_newton import distributed_newton
from .distributed_scan import cross_rank_scan
from .modes import Mode
from .newton import scaled_norm
from .stats import PassStats
from .steps import Steps


def adjoint_distributed(comm: Comm, lengths: Sequence[int], steps: Steps, Zprev: torch.Tensor, G: torch.Tensor,
                        wrt: Sequence[int], mode: Mode, atol: float, rtol: float, max_iter: int, stats: PassStats,
                        replicated: Optional[Steps] = None) -> tuple:
    """``(dZprev, *dinputs)`` for this rank's rows; ``dZprev[0]`` is dLoss/dx0 on the first rank."""
    m = Zprev.shape[0]
    g, inputs, state_pullback = step_functions(steps, Zprev, wrt)

    order = list(reversed(range(comm.size)))
    offsets = [0]
    for r in order:
        offsets.append(offsets[-1] + lengths[r])
    stats.jacobian = mode.name
    # The step's own code runs in these local parts; if it raises, this rank carries a flag into the
    # next exchange and every rank raises there (distributed_comm.raise_failures).
    failure, pullback, J, A_rev, E = None, None, None, None, None
    try:
        _, pullback = vjp(g, Zprev, *(inputs[i] for i in wrt))
        if mode.exact:
            if replicated is not None:
                J, _ = jacobians.try_replicated(replicated.batched(0, m), Zprev, mode)
            if J is None:
                J = jacobians.jacobian_from_pullback(state_pullback, Zprev, mode)
            A_rev, E = _reversed(J, mode)
    except DistributedSolveError:
        raise
    except Exception as exc:
        failure = exc
    run = (comm, order, offsets, steps, state_pullback, Zprev, G, mode, atol, rtol, max_iter, stats)
    if not mode.exact:
        a = _iterate(*run, failure=failure)
        return pullback(a)
    a = cross_rank_scan(comm, order.index(comm.rank), order, A_rev, G.flip(0), E, mode, G[0],
                        "adjoint scan", failure).flip(0)
    stats.iterations = 1
    grads = None
    try:
        grads = pullback(a)
    except DistributedSolveError:
        raise
    except Exception as exc:
        failure = exc
    if _residual_ok_everywhere(comm, a, G, None if grads is None else grads[0], atol, rtol, failure):
        stats.converged = True
        return grads
    stats.iterations = 0
    a = _iterate(*run, J=J, initial=a)
    return pullback(a)


def _reversed(J: torch.Tensor, mode: Mode) -> tuple:
    """(A in logical order, E) from the Jacobians J (m, B, n, n) or diagonals (m, B, n) of this rank's steps:
    transposed (``mode.transpose``), reversed, and the identity map (``mode.unit``) on logical row 0."""
    Jt = mode.transpose(J)
    one = mode.unit(J.shape[1], J.shape[2], J).unsqueeze(0)
    return torch.cat([one, Jt.flip(0)[:-1]]), Jt[0]


def _adjoint_residual_ok(a: torch.Tensor, G: torch.Tensor, products: torch.Tensor, atol: float, rtol: float) -> bool:
    """Whether a_k = G_k + J_{k+1}^T a_{k+1} holds for this rank's rows k < m-1, given ``products[k]`` = J_k^T a_k
    (``adjoint._adjoint_residual_ok``: normwise per sample, relative to the cotangents)."""
    if a.shape[0] < 2:
        return True
    rhs = G[:-1] + products[1:]
    scale = a[:-1].abs() + G[:-1].abs() + products[1:].abs()
    return bool((scaled_norm(a[:-1] - rhs, scale, atol, rtol) <= 1).all())


def _residual_ok_everywhere(comm: Comm, a: torch.Tensor, G: torch.Tensor, products: Optional[torch.Tensor],
                            atol: float, rtol: float, failure: Optional[BaseException] = None) -> bool:
    """The adjoint equations on every row of every rank (``adjoint._adjoint_residual_ok``), with the
    rank boundaries checked from one all-gather of (a_last, G_last, J_first^T a_first) per rank.
    ``failure``: this rank's pullback raised (flag -1: every rank raises)."""
    if failure is not None:
        ok, products = -1.0, torch.zeros_like(a)
    else:
        ok = float(_adjoint_residual_ok(a, G, products, atol, rtol))
    packed = torch.cat([a.new_tensor([ok]), a[-1].reshape(-1), G[-1].reshape(-1), products[0].reshape(-1)])
    rows = comm.gather(packed, "adjoint check").cpu()
    raise_failures(comm, (rows[:, 0] < 0).tolist(), failure, "the adjoint's pullback")
    if not bool((rows[:, 0] > 0).all()):
        return False
    size = a[-1].numel()
    shape = (rows.shape[0], *a.shape[1:])
    a_last = rows[:, 1:1 + size].view(shape)
    G_last, first = rows[:, 1 + size:1 + 2 * size].view(shape), rows[:, 1 + 2 * size:].view(shape)
    rhs = G_last[:-1] + first[1:]
    scale = a_last[:-1].abs() + G_last[:-1].abs() + first[1:].abs()
    return bool((scaled_norm(a_last[:-1] - rhs, scale, atol, rtol) <= 1).all())


def _iterate(comm, order, offsets, steps, state_pullback, Zprev, G, mode, atol, rtol, max_iter, stats,
             J: Optional[torch.Tensor] = None, initial: Optional[torch.Tensor] = None,
             failure: Optional[BaseException] = None) -> torch.Tensor:
    """Solve a = G + shift(J^T a) across ranks with exact products (``adjoint._iterate``, distributed).

    ``failure``: the step already raised on this rank (the first iteration's check tells every rank)."""
    m, last_rank = G.shape[0], comm.rank == comm.size - 1
    A_rev = E = None
    pending = [failure]  # an exception to hand to the driver after this rank's next exchange
    try:
        if failure is None and J is None and mode.linearised:  # an approximate mode forms its own (diag)
            J = jacobians.jacobian_from_pullback(state_pullback, Zprev, mode)
        if failure is None and J is not None:
            A_rev, E = _reversed(J, mode)
    except DistributedSolveError:
        raise
    except Exception as exc:
        pending[0] = exc
    incoming = [torch.zeros_like(G[0])]  # J^T a for the next rank's first state (zero after the last state)

    def evaluate(w0: int, U: torch.Tensor):
        h, error, pending[0] = None, pending[0], None
        if error is None:
            try:
                h = state_pullback(U.flip(0))  # h_k = J_k^T a_k for this rank's states
            except DistributedSolveError:
                raise
            except Exception as exc:
                error = exc
        firsts = comm.gather(torch.full_like(G[0], math.nan) if h is None else h[0], "adjoint halo")
        if error is not None:  # after the exchange: the driver flags it at the convergence check
            raise error
        if not last_rank:
            incoming[0] = firsts[comm.rank + 1]
        vals = (G + torch.cat([h[1:], incoming[0].unsqueeze(0)])).flip(0)[w0:]
        return vals, lambda: (None if A_rev is None else A_rev[w0:], E)

    def finish(w0: int, U: torch.Tensor, given: Optional[torch.Tensor]) -> torch.Tensor:
        v = incoming[0] if given is None else given
        for j in range(w0, m):
            k = m - 1 - j
            if j == 0:
                U[0] = G[k] + v
                continue
            _, pb = vjp(lambda z: steps.single(k + 1, z), Zprev[k + 1])
            U[j] = G[k] + pb(U[j - 1])[0]
        _, pb = vjp(lambda z: steps.single(0, z), Zprev[0])
        return pb(U[m - 1])[0]

    U = torch.zeros_like(G) if initial is None else initial.flip(0).clone()
    distributed_newton(comm, order, offsets, evaluate, finish, U, mode, atol, rtol, max_iter, stats,
                       record=True, what="adjoint")
    return U.flip(0)
