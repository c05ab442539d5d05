"""One Newton iteration as one compiled function, and the driver that calls it with few host syncs.

The eager driver (``newton.triangular_newton``) moves a window over the rows and decides on the
host after every iteration. Here the whole iteration is a pure function of fixed-shape tensors,

    (U, x0, start, previous, status, count, *inputs) -> (U', start', previous', status', count', record)

traced once per step and signature (``backend.compile_traced``) and compiled by inductor:

    vals, A = f(U shifted by one row), its Jacobians     one batched evaluation (vmap), vjp rows
    r       = vals - U;  ratio = scaled_norm(r, U)          per row, as in ``newton``
    worst   = max of ratio over rows >= start;  converged = worst <= COHERENT (an exact mode: <= 1)
    start'  = first row >= start with ratio > COHERENT      (rows before it are final)
    delta   = scan(A, r masked to rows >= start')          ``fused_scan``: broadcasts, static shapes
    U'      = U + delta, row start' set to vals exactly     (a no-op once ``status`` is set)

The window is a mask instead of a slice, so the shapes never change. ``status`` is 0 while
iterating, 1 once converged, 2 once a residual was non-finite; an iteration after that changes
nothing, so the driver reads the flags only every ``check_every`` iterations (one ``.tolist()``)
and once at the end (the per-iteration residuals and windows for ``PassStats``, another). The same
rules as the eager driver: rows freeze at ratio <= COHERENT, full mode converges at ratio <= 1 and
adds a last update after a quadratic step (here with the Jacobians just formed: a plain Newton
step), the first window row is exact after each update, so at most L iterations.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch.func import vjp, vmap

from . import fused_scan, jacobians
from .modes import Mode
from .adjoint import with_replaced
from .newton import COHERENT, scaled_norm
from .state import StateSpec
from .stats import PassStats

RUNNING, CONVERGED, NON_FINITE = 0, 1, 2


def batched_step(step: Callable, spec: StateSpec, n_per_step: int, n_shared: int) -> Callable:
    """``(Zprev (R, B, n), *per_step (R, ...), *shared) -> Znext``: all R steps in one vmap call, no
    per-step fallback (a step vmap cannot batch is not compiled)."""
    def one(z, *args):
        return spec.flatten(step(spec.unflatten(z), *args))

    return vmap(one, in_dims=(0,) * (1 + n_per_step) + (None,) * n_shared)


# A layer-parallel slice at least this long (CPU) uses the chunked scan with FUSED_CHUNK rows per chunk in
# its compiled functions, whose running products it reuses to apply the incoming state; a shorter one
# cyclic reduction with its products by PCR. (One process uses cyclic reduction at every length:
# ``fused_solve.CompiledForward.chunk``.) Measured fwd + bwd per solve, compiled, one run each (load ~6):
# L = 16384, w = 2: 158 ms chunked vs 264 ms PCR; L = 4096, w = 4: 21.6 vs 24.0 ms; but the chunked
# scan costs far more compile time (52-73 s vs 9-40 s first call), so only where the log2 L factor
# of PCR's work is large.
FUSED_CHUNK_MIN_LENGTH, FUSED_CHUNK = 8192, 16


def fused_chunk(length: int, device: torch.device) -> int:
    """Rows per chunk of a layer-parallel slice's compiled scan: FUSED_CHUNK on CPU for L >=
    FUSED_CHUNK_MIN_LENGTH, else 0 (cyclic reduction)."""
    return FUSED_CHUNK if device.type == "cpu" and length >= FUSED_CHUNK_MIN_LENGTH else 0


class NewtonIteration:
    """The traced function of one forward Newton iteration for one step and signature."""

    def __init__(self, step: Callable, spec: StateSpec, n_per_step: int, n_shared: int, mode: Mode,
                 atol: float, rtol: float, chunk: int) -> None:
        self.mode, self.atol, self.rtol, self.chunk = mode, atol, rtol, chunk
        self.g = batched_step(step, spec, n_per_step, n_shared)

    def linearise(self, Zprev: torch.Tensor, inputs: tuple):
        """``(vals, A)``: the steps at ``Zprev`` and their Jacobians in the mode's structure (or None).

        Always the vmap'd pullback: compiled, its n cotangent passes fuse into a few loops (L = 4096,
        n = 4: 0.8 ms), while the eager runtime's faster replicated batch (``jacobians``) compiles to
        library bmm calls on tiny matrices (3.5 ms)."""
        g = lambda Z: self.g(Z, *inputs)  # noqa: E731
        if not self.mode.linearised:
            return g(Zprev), None
        vals, pullback = vjp(g, Zprev)
        return vals, jacobians.jacobian_from_pullback(lambda c: pullback(c)[0], vals, self.mode)

    def __call__(self, U, x0, start, previous, status, count, *inputs):
        Zprev = torch.cat([x0.unsqueeze(0), U[:-1]])
        vals, A = self.linearise(Zprev, inputs)
        return self.update(U, start, previous, status, count, vals, A)

    def update(self, U, start, previous, status, count, vals, A):
        """The iteration after the linearise: residual, window, scan, update (the steps ``vals`` at Zprev and
        their Jacobians ``A`` given)."""
        L = U.shape[0]
        residual = vals - U
        ratio = scaled_norm(residual, U, self.atol, self.rtol)
        rows = torch.arange(L, device=U.device)
        active = rows >= start
        worst = torch.where(active, ratio, torch.zeros_like(ratio)).amax()
        finite = torch.isfinite(worst)
        converged = (worst <= COHERENT) | ((worst <= 1) if self.mode.exact else torch.zeros_like(finite))
        bad = active & (ratio > COHERENT)
        new_start = torch.where(bad.any(), bad.to(torch.int32).argmax(), start)
        correct = converged & (worst > COHERENT) & (previous > 1 / COHERENT)  # full mode's last update
        first = torch.where(converged, start, new_start)
        r = torch.where((rows >= first).view(L, 1, 1), residual, torch.zeros_like(residual))
        delta = fused_scan.scan(A, r, self.mode, chunk=self.chunk)
        U_new = torch.where((rows == first).view(L, 1, 1), vals, U + delta)
        running = status == RUNNING
        update = running & finite & (~converged | correct)
        U_out = torch.where(update, U_new, U)
        start_out = torch.where(running & finite & ~converged, new_start, start)
        previous_out = torch.where(running, worst, previous)
        status_out = torch.where(running, torch.where(finite, torch.where(converged, CONVERGED, RUNNING), NON_FINITE),
                                 status).to(status.dtype)
        record = torch.stack([start.to(U.dtype), worst, status.to(U.dtype)])  # run_newton's per-iteration stats
        return U_out, start_out, previous_out, status_out, count + running.to(count.dtype), record


class RowNewtonIteration(NewtonIteration):
    """The iteration without its linearise: ``(U, start, previous, status, count, vals, A)``, the steps and
    their Jacobians at Zprev computed before the call (on CPU by ``rowloop``'s generated C++ loop over the
    rows, ``rowloop.RowCall``)."""

    def __call__(self, U, start, previous, status, count, vals, A):
        return self.update(U, start, previous, status, count, vals, A)


def run_newton(call: Callable, U: torch.Tensor, x0: torch.Tensor, inputs: tuple, start: int, max_iter: int,
               check_every: int, stats: PassStats, record: bool,
               on_iteration: Optional[Callable[[int, int, float], None]] = None) -> tuple[torch.Tensor, int, int]:
    """Iterate ``call`` (a compiled ``NewtonIteration``) from ``U`` whose rows before ``start`` are final.

    Returns ``(U, status, start)``: the status (CONVERGED, NON_FINITE or RUNNING when ``max_iter`` ran
    out) and the first row that is not final. Host syncs: one ``.tolist()`` every ``check_every``
    iterations and one at the end (``check_every=1`` when ``on_iteration`` is given)."""
    device = U.device
    start_t = torch.tensor(start, device=device)
    previous = torch.tensor(math.inf, dtype=U.dtype, device=device)
    status = torch.tensor(RUNNING, dtype=torch.int8, device=device)
    count = torch.tensor(0, device=device)
    history = []  # the calls' records (start before, worst, status before), read once at the end
    check_every = 1 if on_iteration is not None else max(1, check_every)
    flags = [RUNNING, start, 0]
    for i in range(max_iter):
        U, start_t, previous, status, count, row = call(U, x0, start_t, previous, status, count, *inputs)
        if record:
            history.append(row)
        if (i + 1) % check_every == 0 or i + 1 == max_iter:
            flags = torch.stack([status.to(torch.int64), start_t, count]).tolist()  # the one host sync
            if on_iteration is not None:
                on_iteration(flags[2], U.shape[0] if flags[0] == CONVERGED else flags[1] + 1, float(row[1]))
            if flags[0] != RUNNING:
                break
    stats.iterations = flags[2]
    if record and history:
        for w_start, worst, st in torch.stack(history).tolist():
            if st == RUNNING:
                stats.window_starts.append(int(w_start))
                stats.residuals.append(worst)
    return U, flags[0], flags[1]


class FullAdjoint:
    """The traced backward pass of a chain in an exact mode (full; ``adjoint.adjoint``'s first path) in one
    function:

        J      = the per-sample Jacobians at Zprev          (vmap'd state pullback, as forward)
        a      = reverse scan  a_k = G_k + J_{k+1}^T a_{k+1}, refined once (see below)
        grads  = one pullback of all steps with cotangent a: dLoss/dZprev and the inputs ``wrt``
        ok     = whether the adjoint equations hold (they fail only if a step couples samples)

    Returns ``(ok, dZprev, *dinputs)``; where ``ok`` is False the caller runs the eager adjoint, which
    iterates with exact products."""

    def __init__(self, step: Callable, spec: StateSpec, n_per_step: int, n_shared: int, wrt: tuple,
                 mode: Mode, atol: float, rtol: float, chunk: int) -> None:
        self.f = batched_step(step, spec, n_per_step, n_shared)
        self.wrt, self.mode, self.atol, self.rtol, self.chunk = wrt, mode, atol, rtol, chunk

    def __call__(self, Zprev, G, *inputs):
        vals, state_pullback = vjp(lambda Z: self.f(Z, *inputs), Zprev)
        J = jacobians.jacobian_from_pullback(lambda c: state_pullback(c)[0], vals, self.mode)
        return self.solve(Zprev, G, J, inputs)

    def solve(self, Zprev, G, J, inputs):
        """The adjoint given the Jacobians ``J`` at Zprev: scan, refinement, the pullback's gradients, the check."""
        g = with_replaced(self.f, inputs, self.wrt)
        vals, pullback = vjp(g, Zprev, *(inputs[i] for i in self.wrt))
        a = fused_scan.scan(J, G, self.mode, transpose=True, chunk=self.chunk)
        grads = pullback(a)
        # One step of iterative refinement: the scan's round-off in float32 grows with its log2 L levels of
        # matrix products (L = 256: 5x the tolerance), the exact products J_k^T a_k of the pullback give
        # the defect of the adjoint equations, and the same scan solves for its correction.
        products = grads[0]
        defect = torch.cat([G[:-1] + products[1:], G[-1:]]) - a
        a = a + fused_scan.scan(J, defect, self.mode, transpose=True, chunk=self.chunk)
        grads = pullback(a)
        products = grads[0]  # J_k^T a_k: the adjoint equations a_k = G_k + J_{k+1}^T a_{k+1}, checked for free
        rhs = G[:-1] + products[1:]
        scale = a[:-1].abs() + G[:-1].abs() + products[1:].abs()
        ok = (scaled_norm(a[:-1] - rhs, scale, self.atol, self.rtol) <= 1).all()
        return (ok, *grads)


class RowFullAdjoint(FullAdjoint):
    """``FullAdjoint`` with the Jacobians at Zprev as an input, ``(Zprev, G, J, *inputs)``: on CPU from
    ``rowloop``'s C++ loop over the rows (``rowloop.AdjointRowCall``)."""

    def __call__(self, Zprev, G, J, *inputs):
        return self.solve(Zprev, G, J, inputs)


# Steps per call of the compiled sequential finish: L / K calls of one compiled function that runs K
# steps one after another. Each call costs ~0.1-0.2 ms of wrappers on this CPU, and the compile time
# grows with K: at L = 16384, w = 2, K = 16: 112 ms per finish (eager 325 ms), first call 8.5 s;
# K = 64: 57 ms (eager 424 ms), 20.6 s. So 64 for long chains, 16 otherwise.
FINISH_CHUNK, FINISH_CHUNK_LONG = 16, 64


def finish_chunk(length: int) -> int:
    """Steps per call of the compiled sequential finish (see FINISH_CHUNK)."""
    return FINISH_CHUNK_LONG if length >= FUSED_CHUNK_MIN_LENGTH else FINISH_CHUNK


class SequentialChunk:
    """``(z (B, n), *per_step rows (K, ...), *shared) -> (K, B, n)``: K steps one after another, unrolled,
    for the compiled sequential finish (``run_finish``). Each step is written into one output buffer
    (``torch.stack`` of the K steps made inductor's code allocate and copy more per step: tanh MLP, w = 2,
    K = 64: 69 vs 407 us per call, benchmarks/results/peers_cpu_fused_perf.txt)."""

    def __init__(self, step: Callable, spec: StateSpec, n_per_step: int, chunk: int) -> None:
        self.step, self.spec, self.n_per_step, self.chunk = step, spec, n_per_step, chunk

    def __call__(self, z, *args):
        per_step, shared = args[:self.n_per_step], args[self.n_per_step:]
        out = None
        for k in range(self.chunk):
            z = self.spec.flatten(self.step(self.spec.unflatten(z), *(p[k] for p in per_step), *shared))
            if out is None:
                out = z.new_empty((self.chunk, *z.shape))
            out[k] = z
        return out


def finish_args(z: torch.Tensor, per_step: tuple, shared: tuple, lo: int, chunk: int) -> tuple:
    """The arguments of the chunk that starts at row ``lo`` (rows past L repeat the last one; their
    results are dropped)."""
    length = per_step[0].shape[0] if per_step else None
    if length is not None and lo + chunk > length:
        idx = torch.arange(lo, lo + chunk, device=z.device).clamp_(max=length - 1)
        return (z, *(p.index_select(0, idx) for p in per_step), *shared)
    return (z, *(p[lo:lo + chunk] for p in per_step), *shared)


def run_finish(call: Callable, chunk: int, start: int, U: torch.Tensor, x0: torch.Tensor,
               per_step: tuple, shared: tuple) -> None:
    """Overwrite rows ``start..L-1`` of ``U`` with the sequential chain, ``chunk`` steps per call."""
    length = U.shape[0]
    z = x0 if start == 0 else U[start - 1]
    for lo in range(start, length, chunk):
        rows = call(*finish_args(z, per_step, shared, lo, chunk))
        m = min(chunk, length - lo)
        U[lo:lo + m] = rows[:m]
        z = U[lo + m - 1]
