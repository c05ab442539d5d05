"""The layer-parallel backward pass (exact mode, ``full``) with each rank's local work compiled.

``distributed_adjoint``'s first path, split at its one scan exchange (two ranks at most; the logical
order is reversed: the group's last rank comes first):

    local(Zprev, G, *inputs) -> (flag row, d[, P, Q])   the per-sample Jacobians (vmap'd pullback), the
        reversed transposed system, its scan for a zero input; the first logical rank sends its map
        E d_last (E = its first J^T), the other keeps the products that add its input later
        (``distributed_products.scan_products``)
    comm.gather                                        eager
    apply(Zprev, d[, P, Q, x_in], *inputs) -> (a, dZprev, *dinputs)   a = d (+ Phi x_in), one pullback
    the adjoint equations checked on every row and across the boundary (``_residual_ok_everywhere``,
    one more all-gather, as the eager path)

Where the check fails on any rank (samples coupled within a step), or a compiled call raised, every
rank runs the eager ``adjoint_distributed`` instead (the same collectives everywhere: both decisions
come from gathered flags). Used only after a compiled forward solve (the ranks agreed on the backend).
The adjoint's own backend rides on the scan exchange: a rank without its compiled functions flags it
there; then every rank builds what it lacks (``_build``: a pickled gather compares the results) and
the exchange runs again. So a backward pass with compiled functions in place has no agreement exchange.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.func import vjp

from . import backend, fused_scan, jacobians
from .adjoint import with_replaced
from .distributed_adjoint import _residual_ok_everywhere
from .distributed_products import propagate, rank_chunk, scan_products
from .fused import batched_step


class AdjointLocal:
    def __init__(self, step: Callable, spec, n_per_step: int, n_shared: int, mode, chunk: int, first: bool) -> None:
        self.f = batched_step(step, spec, n_per_step, n_shared)
        self.mode, self.chunk, self.first = mode, chunk, first

    def __call__(self, Zprev, G, *inputs):
        vals, state_pullback = vjp(lambda Z: self.f(Z, *inputs), Zprev)
        J = jacobians.jacobian_from_pullback(lambda c: state_pullback(c)[0], vals, self.mode)
        Jt = self.mode.transpose(J)
        one = self.mode.unit(J.shape[1], J.shape[2], J).unsqueeze(0)
        A_rev, r = torch.cat([one, Jt.flip(0)[:-1]]), G.flip(0)
        flag = G.new_zeros(1, dtype=torch.float64)
        if self.first:  # its input is zero; its map: E d_last, E its first step's J^T
            d = fused_scan.scan(A_rev, r, self.mode, chunk=self.chunk)
            return torch.cat([flag, self.mode.fused_apply(Jt[0], d[-1]).reshape(-1).double()]), d
        d, P, Q = scan_products(A_rev, r, self.mode, self.chunk)
        return (torch.cat([flag, G.new_zeros(G[0].numel(), dtype=torch.float64)]), d, P) + (() if Q is None else (Q,))


class AdjointApply:
    def __init__(self, step: Callable, spec, n_per_step: int, n_shared: int, wrt: tuple, mode, first: bool,
                 with_q: bool) -> None:
        self.f = batched_step(step, spec, n_per_step, n_shared)
        self.wrt, self.mode, self.first, self.with_q = wrt, mode, first, with_q

    def __call__(self, Zprev, d, *args):
        if self.first:
            a_rev, inputs = d, args
        else:
            k = 3 if self.with_q else 2
            P, Q, x_in = args[0], args[1] if self.with_q else None, args[k - 1]
            a_rev, inputs = d + propagate(P, Q, x_in, self.mode, d.shape[0]), args[k:]
        a = a_rev.flip(0)

        _, pullback = vjp(with_replaced(self.f, inputs, self.wrt), Zprev, *(inputs[i] for i in self.wrt))
        return (a, *pullback(a))


def compiled_adjoint(problem, steps, Zprev: torch.Tensor, G: torch.Tensor, wrt: list) -> Optional[tuple]:
    """``(dZprev, *dinputs)`` as ``adjoint_distributed`` returns them, or None: every rank runs the eager
    adjoint (the same decision on every rank)."""
    comm, mode, stats = problem.comm, problem.mode, problem.stats
    if stats.forward.backend != "inductor" or not mode.exact or comm.size > 2:
        return None  # the same on every rank: the forward's backend was agreed, the rest is the chain's
    first = comm.rank == comm.size - 1  # first in the reversed (logical) order
    m = Zprev.shape[0]
    chunk = rank_chunk(m, Zprev.device, products=not first)
    with_q = 1 < chunk < m
    compiled = problem.compiled
    key = compiled._key(Zprev.device) + ("adjoint", tuple(wrt), problem.adjoint_atol, problem.adjoint_rtol)
    entries = (backend.entry(compiled.user_step, key), backend.entry(compiled.user_step, key + ("apply",)))
    # the scan exchange carries the backend agreement: each rank's flag says whether it ran its compiled
    # local half (_OK), could not (_MISSING: no compiled functions yet; _UNUSABLE: none possible) or it raised
    out = _local(entries, Zprev, G, steps.inputs)
    rows = comm.gather(out[0], "adjoint scan")
    flags = rows[:, 0].tolist()
    if _FAILED in flags or _UNUSABLE in flags:
        return None
    if _MISSING in flags:  # every rank can compile: those without build theirs, then the exchange again
        if _build(problem, steps, Zprev, G, tuple(wrt), first, chunk, with_q, entries) is None:
            return None
        out = _local(entries, Zprev, G, steps.inputs)
        rows = comm.gather(out[0], "adjoint scan")
        if bool((rows[:, 0] != _OK).any()):
            return None
    apply = entries[1].fn
    try:
        if first:
            a, *grads = apply(Zprev, out[1], *steps.inputs)
        else:
            x_in = rows[comm.size - 1, 1:].to(G.dtype).view_as(G[0])
            a, *grads = apply(Zprev, *out[1:], x_in, *steps.inputs)
    except Exception:  # noqa: BLE001 - NaN fails the check below on this rank, so every rank falls back
        a, grads = torch.full_like(G, float("nan")), None
    if not _residual_ok_everywhere(comm, a, G, torch.zeros_like(G) if grads is None else grads[0],
                                   problem.adjoint_atol, problem.adjoint_rtol):
        return None
    b = stats.backward
    b.iterations, b.converged, b.jacobian, b.backend = 1, True, mode.name, "inductor"
    return tuple(grads)


_OK, _FAILED, _MISSING, _UNUSABLE = 0.0, 1.0, 2.0, 3.0


def _local(entries: tuple, Zprev: torch.Tensor, G: torch.Tensor, inputs: tuple) -> tuple:
    """The compiled local half's outputs (the exchange row first, its flag _OK), or ``(row with a flag,)``."""
    row = G.new_zeros(1 + G[0].numel(), dtype=torch.float64)
    if not all(e is not None and e.error is None for e in entries):
        row[0] = _UNUSABLE
    elif not all(e.fn is not None for e in entries):
        row[0] = _MISSING
    else:
        try:
            return entries[0].fn(Zprev, G, *inputs)
        except Exception:  # noqa: BLE001 - every rank falls back together (the flag)
            row[0] = _FAILED
    return (row,)


def _build(problem, steps, Zprev, G, wrt: tuple, first: bool, chunk: int, with_q: bool,
           entries: tuple) -> Optional[tuple]:
    """Compile the adjoint's two functions where this rank lacks them; every rank compares results (a pickled
    gather, only in a backward pass that compiles): ``entries``, or None on every rank."""
    comm, mode = problem.comm, problem.mode
    error = None
    if not all(e.fn is not None for e in entries):
        n_ps, n_sh = len(steps.per_step), len(steps.shared)
        cuda_graphs = problem.config.cuda_graphs and G.device.type == "cuda"
        out = backend.build(entries[0], AdjointLocal(steps.step, problem.spec, n_ps, n_sh, mode, chunk, first),
                            (Zprev, G, *steps.inputs), cuda_graphs)
        if out is None:
            error = entries[0].error
        else:
            x_in = () if first else (torch.zeros_like(G[0]),)
            fn = AdjointApply(steps.step, problem.spec, n_ps, n_sh, wrt, mode, first, with_q)
            if backend.build(entries[1], fn, (Zprev, *out[1:], *x_in, *steps.inputs), cuda_graphs) is None:
                error = entries[1].error
    errors = comm.gather_objects(error, "adjoint backend (compile)")
    if any(e is not None for e in errors):
        message = "; ".join(f"rank {r}: {e}" for r, e in enumerate(errors) if e is not None)
        for found in entries:
            found.error, found.fn = message, None
        return None
    return entries
