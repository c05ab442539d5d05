"""The layer-parallel forward solve with each rank's local work compiled (``Config.backend``).

``distributed_newton`` (the eager reference) splits a Newton iteration at its collective; here the
two halves are compiled functions of fixed-shape tensors (traced once per step and signature and
compiled by inductor, ``backend.compile_traced``, as ``runtime/fused.py`` does in one process):

    local(U, halo, w0, *inputs) -> (buf, vals, ...)    batched steps, Jacobians, residual, ratios,
        the window start w0 as a mask; the first rank also scans its rows from its first unconverged
        row (its map is its last row); packs the exchange row (``distributed_scan.Packing``)
    comm.gather(buf)                                   the all-gather, eager
    host: the same decisions as ``distributed_newton`` (flags, global window, stop, remainder)
    fold(...)                                          the gathered maps (eager, ``distributed_scan.fold``)
    apply(U, vals, ..., x_in, w1, g) -> U'             the last rank's sweep with its input folded in
        (the first rank adds its scan); the first unconverged row set to its step value

With two ranks the work between two exchanges is balanced: the first rank's apply is cheap and its local
half scans, the last rank's local half only linearises and its apply scans. (Until 2026-12-02 the last
rank also scanned before the exchange for a zero input and kept chunk products, adding its input after it
with two batched products: more work on the rank that was already the slower one, L = 16384, w = 4:
about 2.1 ms CPU between exchanges vs 1.9 now; layer_parallel_cpu_overhead.txt.)

The plan is always "fresh" (each iteration forms its Jacobians before the exchange): one exchange per
iteration, and a converged exact-mode iteration's remainder update uses that iteration's Jacobians
(a plain Newton step, as the one-process compiled iteration does). The hand-offs (the next rank's halo)
come from ``fold`` on the gathered numbers, as in the eager driver, so both sides hold the same value.
Two ranks at most (a middle rank's pre/post maps are not compiled: more ranks run eagerly).

The backend is a group decision. Every rank votes in the setup exchange (``vote``: it holds the compiled
halves for the layout of its last solve on the group, and a digest of that layout): where every vote names
the real layout, the group runs compiled with no collective of its own. Otherwise (the first solve, a new
layout, ``backend="auto"`` before it compiles) every rank says in one small all-gather whether it wants
the compiled iteration; where all do, those without a compiled function build one and the group compares
results (a pickled gather, only in a solve that compiles). If any rank failed, every rank runs eagerly
and records the same ``backend_error`` (and keeps it: later solves stay eager without compiling again).
"""
from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch

from ..results import FinishCause
from . import backend, fused_scan
from .distributed_comm import Comm, DistributedSolveError
from .distributed_newton import _FAILED, _NON_FINITE, _SETUP, _finish, done, read_decision, record_iteration
from .distributed_scan import Packing, fold
from .distributed_setup import _hash
from .distributed_products import rank_chunk
from .fused import NewtonIteration
from .fused_solve import _tracing
from .modes import Mode, choose_mode, mode_of
from .newton import COHERENT, scaled_norm

MAX_RANKS = 2

def key_of(mode: Mode, spec, atol: float, rtol: float, lengths: list, rank: int, constants: tuple, inputs: tuple,
           n_per_step: int, device: torch.device) -> tuple:
    """The cache key of a rank's compiled halves (``backend.entry``; ``("apply",)`` appended for the second)."""
    m, lo, total = lengths[rank], sum(lengths[:rank]), sum(lengths)
    return ("distributed", mode.name, spec, atol, rtol, lo, m, total, len(lengths), rank,
            rank_chunk(m, device, products=False), constants, backend.tensor_signature(inputs),
            n_per_step, device.type)


# --- the backend vote, carried by the setup exchange ---------------------------------------------------
# Each rank predicts the chain's layout (its last solve's on this group: state spec and every slice length)
# and says, in four numbers of the setup exchange (``distributed_setup``'s ``extra``), whether it wants the
# compiled iteration and already holds the compiled halves for that layout, and a digest of the prediction.
# After the exchange every rank knows the real layout: where every rank voted yes for the real layout's
# digest, the group runs compiled with no further collective (``CompiledRank.agree``); otherwise it takes
# the agreement's own all-gather as before. The same gathered numbers decide it on every rank.
VOTE_SIZE = 4
_LAST_LAYOUT: dict = {}  # id(group) -> (group, spec, lengths): this process's last solve on the group


def layout_digest(spec, lengths) -> tuple:
    return _hash((spec, tuple(lengths)))


def remember_layout(comm: Comm, spec, lengths: list) -> None:
    _LAST_LAYOUT[id(comm.group)] = (comm.group, spec, list(lengths))


def vote(comm: Comm, config, user_step: Callable, constants: tuple, inputs: tuple, n_per_step: int,
         device: torch.device) -> list:
    """This rank's vote (see above): ``[want, has, digest]``, zeros where it has no compiled halves to offer."""
    none = [0.0] * VOTE_SIZE
    last = _LAST_LAYOUT.get(id(comm.group))
    if config.backend == "eager" or comm.size > MAX_RANKS or last is None or last[0] is not comm.group \
            or len(last[2]) != comm.size or config.vectorize is False or _tracing():
        return none
    _, spec, lengths = last
    mode = mode_of(choose_mode(config.jacobian, spec.width, config.full_max_state, sum(lengths) * spec.batch_size))
    atol, rtol = config.tolerances(spec.compute_dtype)
    try:
        key = key_of(mode, spec, atol, rtol, lengths, comm.rank, constants, inputs, n_per_step, device)
        entries = [backend.entry(user_step, key + extra) for extra in ((), ("apply",))]
    except Exception:  # noqa: BLE001 - an odd input: the agreement's own exchange decides
        return none
    if any(e is None or e.fn is None or e.error is not None for e in entries):
        return none
    return [1.0, 1.0, *(float(v) for v in layout_digest(spec, lengths))]


def voted(extra_rows: Optional[list], spec, lengths: list) -> bool:
    """Whether every rank voted to run compiled with the halves it holds for the real layout (a group decision:
    it reads only gathered numbers)."""
    if not extra_rows:
        return False
    d0, d1 = layout_digest(spec, lengths)
    return all(r[0] == 1 and r[1] == 1 and r[2] == d0 and r[3] == d1 for r in extra_rows)


def _rows_like(mask: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *([1] * (t.dim() - 1)))


class LocalIteration:
    """The traced first half of one rank's iteration (see the module docstring)."""

    def __init__(self, step: Callable, spec, n_per_step: int, n_shared: int, mode: Mode, atol: float, rtol: float,
                 chunk: int, first: bool, lo: int, total: int, size: int) -> None:
        self.it = NewtonIteration(step, spec, n_per_step, n_shared, mode, atol, rtol, chunk)
        self.mode, self.atol, self.rtol, self.chunk = mode, atol, rtol, chunk
        self.first, self.lo, self.total, self.size = first, lo, total, size

    def __call__(self, U, halo, w0, *inputs):
        m = U.shape[0]
        Zprev = torch.cat([halo.unsqueeze(0), U[:-1]])
        vals, A = self.it.linearise(Zprev, inputs)
        residual = vals - U
        ratio = scaled_norm(residual, U, self.atol, self.rtol)
        rows = torch.arange(m, device=U.device)
        active = rows >= w0
        worst = torch.where(active, ratio, torch.zeros_like(ratio)).amax().double()
        finite = torch.isfinite(worst)
        bad = active & (ratio > COHERENT)
        any_bad = bad.any()
        j = torch.where(any_bad, bad.to(torch.int32).argmax(), m)
        header = torch.stack([torch.where(finite, 0.0, _NON_FINITE).double(),
                              torch.where(any_bad, j + self.lo, self.total).double(),
                              torch.where(finite, worst, 0.0).double()])
        parts = [header, U[-1].reshape(-1).double(), vals[-1].reshape(-1).double()]
        out = [vals]
        if self.first:  # its input is zero: scan its rows from j now; its map is its last row
            keep = rows >= j
            r = torch.where(_rows_like(keep, residual), residual, torch.zeros_like(residual))
            Am = None if A is None else torch.where(_rows_like(keep, A), A, torch.zeros_like(A))
            delta = fused_scan.scan(Am, r, self.mode, chunk=self.chunk)
            if self.mode.couples:
                parts.append(delta[-1].reshape(-1).double())
            out.append(delta)
        else:
            out.append(residual)
            if A is not None:
                out.append(A)
        used = sum(p.numel() for p in parts)
        buf = torch.cat(parts + [header.new_zeros(self.size - used)])
        return (buf, *out)


class ApplyIteration:
    """The traced second half: the update of rows w1.. and row g (the first unconverged row) set to
    its step value. First rank: ``(U, vals, delta, w1, g)``; else ``(U, vals, residual, [A,] x_in, w1, g)``."""

    def __init__(self, mode: Mode, chunk: int, first: bool) -> None:
        self.mode, self.chunk, self.first = mode, chunk, first

    def __call__(self, U, vals, *args):
        *args, w1, g = args
        rows = torch.arange(U.shape[0], device=U.device)
        if self.first:
            delta = args[0]
        else:
            residual, A, x_in = (args[0], args[1], args[2]) if len(args) == 3 else (args[0], None, args[1])
            r = torch.where(_rows_like(rows >= w1, residual), residual, torch.zeros_like(residual))
            if self.mode.couples:  # what enters row w1: A_w1 x_in (identity: x_in)
                into = x_in.unsqueeze(0) if A is None else \
                    self.mode.fused_apply(A.index_select(0, w1.reshape(1)), x_in.unsqueeze(0))
                r = r + torch.where(_rows_like(rows == w1, r), into, torch.zeros_like(into))
            if A is not None:
                A = torch.where(_rows_like(rows > w1, A), A, torch.zeros_like(A))
            delta = fused_scan.scan(A, r, self.mode, chunk=self.chunk)
        return _update(U, vals, delta, rows, w1, g)


def _update(U: torch.Tensor, vals: torch.Tensor, delta: torch.Tensor, rows: torch.Tensor, w1: torch.Tensor,
            g: torch.Tensor) -> torch.Tensor:
    """Rows w1.. moved by ``delta``; row g (the first unconverged row) set to its step value."""
    U_new = torch.where(_rows_like(rows >= w1, U), U + delta, U)
    return torch.where(_rows_like(rows == g, U), vals, U_new)


class CompiledRank:
    """One distributed solve's view of the compiled-function cache (``backend``), and the group's agreement."""

    def __init__(self, problem, user_step: Callable, constants: tuple) -> None:
        self.problem, self.user_step, self.constants = problem, user_step, constants
        self.entries: Optional[tuple] = None  # (local, apply) cache entries, once looked up
        self.voted = False  # every rank voted in the setup exchange to run compiled (``voted``)

    def _key(self, device: torch.device) -> tuple:
        p = self.problem
        return key_of(p.mode, p.spec, p.atol, p.rtol, p.lengths, p.comm.rank, self.constants, p.steps.inputs,
                      len(p.steps.per_step), device)

    def _chunk(self, device: torch.device) -> int:
        return rank_chunk(self.problem.lengths[self.problem.comm.rank], device, products=False)

    def _eligible(self, setup_error: Optional[str]) -> Optional[str]:
        """None, or why this rank cannot run the compiled iteration (a group decision follows)."""
        p = self.problem
        if p.steps.vectorize is False or p.steps.vmap_error is not None:
            return p.steps.vmap_error or "the step is not vectorized (Config.vectorize=False)"
        if setup_error is not None:
            return "the first step check failed"
        if _tracing():
            return "inside a TorchDynamo or torch.jit trace"
        return None

    def agree(self, U: torch.Tensor, halo: torch.Tensor, setup_error: Optional[str]) -> bool:
        """Whether every rank runs the compiled iteration in this solve (a collective when the backend is
        not ``"eager"`` and the group has at most MAX_RANKS ranks; every rank reaches the same answer and
        the same ``stats.backend_error``)."""
        p = self.problem
        cfg, comm, stats = p.config, p.comm, p.stats
        if cfg.backend == "eager":
            return False
        if comm.size > MAX_RANKS:  # the same on every rank: no exchange needed
            stats.backend_error = (f"the compiled layer-parallel iteration supports at most {MAX_RANKS} ranks "
                                   f"(a group of {comm.size} runs eagerly)")
            return False
        device = U.device
        if self.voted:  # the setup exchange decided: every rank holds its halves for this layout
            self.entries = tuple(backend.entry(self.user_step, self._key(device) + extra)
                                 for extra in ((), ("apply",)))
            if not all(e is not None and e.fn is not None for e in self.entries):
                raise RuntimeError("deeppcr internal error: the compiled layer-parallel halves this rank voted "
                                   "for are missing")  # vote() checked them for the same key
            return True
        reason = self._eligible(setup_error)
        if reason is None:
            key = self._key(device)
            self.entries = tuple(backend.entry(self.user_step, key + extra)
                                 for extra in ((), ("apply",)))
            if any(e is None for e in self.entries):
                self.entries, reason = None, "the step or a non-tensor shared value cannot be a cache key"
        local = self.entries[0] if reason is None else None
        chunked = self._chunk(device) > 0
        want = reason is None and backend.use_compiled(cfg.backend, local, device, chunked=chunked)
        has = want and all(e.fn is not None for e in self.entries)
        error = None if local is None else local.error  # after a failed group compile: the group's message
        flags = comm.gather(torch.tensor([float(want), float(has), float(reason is not None), float(error is not None)],
                                         device=device), "backend agreement").tolist()
        if not all(f[0] for f in flags):
            # every rank's error is the group's message of one failed compile (or there is none); the reasons
            # may differ between ranks only where some rank is ineligible or some has no error: a pickled gather
            if any(f[2] for f in flags) or len({f[3] for f in flags}) > 1:
                stats.backend_error = self._group_error(comm, reason or error)
            else:
                stats.backend_error = error
            return False
        if all(f[1] for f in flags):
            return True
        t0 = time.perf_counter()
        error = None if has else self._build(U, halo, cfg.cuda_graphs and device.type == "cuda")
        seconds = time.perf_counter() - t0
        gathered = comm.gather_objects((error, seconds), "backend agreement (compile)")
        if any(e is not None for e, _ in gathered):
            message = "; ".join(f"rank {r}: {e}" for r, (e, _) in enumerate(gathered) if e is not None)
            for found in self.entries:  # every rank stays eager from now on, with the same reason
                found.error = message
                found.fn = None
            stats.backend_error = message
            return False
        stats.compile_s = max(s for _, s in gathered)
        return True

    def _group_error(self, comm: Comm, mine: Optional[str]) -> str:
        """The same message on every rank (a pickled gather; only where some rank cannot compile)."""
        errors = comm.gather_objects(mine, "backend agreement (reasons)")
        return "; ".join(f"rank {r}: {e}" for r, e in enumerate(errors) if e is not None)

    def _build(self, U: torch.Tensor, halo: torch.Tensor, cuda_graphs: bool) -> Optional[str]:
        p = self.problem
        comm, steps, mode = p.comm, p.steps, p.mode
        lo, total = sum(p.lengths[:comm.rank]), sum(p.lengths)
        first = comm.rank == 0
        chunk = self._chunk(U.device)
        size = Packing(mode, U[0], comm.size).size
        local_fn = LocalIteration(steps.step, p.spec, len(steps.per_step), len(steps.shared), mode, p.atol, p.rtol,
                                  chunk, first, lo, total, size)
        local_entry, apply_entry = self.entries
        zero = torch.tensor(0, device=U.device)
        out = backend.build(local_entry, local_fn, (U, halo, zero, *steps.inputs), cuda_graphs)
        if out is None:
            return local_entry.error
        x_in = torch.zeros_like(halo)
        # w1 and g as two tensor objects: the trace takes one object passed twice for one input, and the
        # compiled apply would then read g for w1 (they differ on the last rank: w1 = 0 below its window)
        w1, g = torch.tensor(0, device=U.device), torch.tensor(0, device=U.device)
        if backend.build(apply_entry, ApplyIteration(mode, chunk, first), self._apply_args(U, out, x_in, w1, g),
                         cuda_graphs) is None:
            return apply_entry.error
        return None

    def _apply_args(self, U: torch.Tensor, out: tuple, x_in: torch.Tensor, w1: torch.Tensor, g: torch.Tensor) -> tuple:
        """``ApplyIteration``'s arguments from ``LocalIteration``'s outputs ``out``."""
        if self.problem.comm.rank == 0:
            return (U, out[1], out[2], w1, g)
        return (U, out[1], out[2], *([out[3]] if self.problem.mode.linearised else []), x_in, w1, g)

    def record_eager(self, seconds: float) -> None:
        if self.entries is not None and self.entries[0] is not None:
            self.entries[0].eager_s += seconds

    def solve(self, U: torch.Tensor, inputs: tuple, finish: Callable, max_iter: int, record: bool,
              on_iteration, setup_error: Optional[str]) -> torch.Tensor:
        """``distributed_newton``'s forward solve with the compiled halves (see the module docstring)."""
        p = self.problem
        comm, mode, stats, offsets = p.comm, p.mode, p.stats.forward, [0]
        for n_steps in p.lengths:
            offsets.append(offsets[-1] + n_steps)
        P, pos = comm.size, comm.rank
        first, last = pos == 0, pos == P - 1
        lo, hi, total = offsets[pos], offsets[pos + 1], offsets[-1]
        m = hi - lo
        order = list(range(P))
        local, apply = (e.fn for e in self.entries)
        packing = Packing(mode, U[0], P)
        stats.jacobian, stats.backend = mode.name, "inductor"
        p.stats.backend = "inductor"
        g, previous = 0, math.inf
        device = U.device
        while True:
            w0 = min(max(g - lo, 0), m)
            if stats.iterations >= max_iter:
                return _finish(comm, order, offsets, finish, U, g, stats, FinishCause.MAX_ITER, "forward")
            failure, out = None, None
            try:
                if setup_error is not None:
                    buf = packing.new()
                    buf[0] = _SETUP
                else:
                    out = local(U, p.halo, torch.tensor(w0, device=device), *inputs)
                    buf = out[0]
            except DistributedSolveError:
                raise
            except Exception as exc:  # noqa: BLE001 - every rank stops at the check below
                failure, buf = exc, packing.new()
                buf[0] = _FAILED
            rows = comm.gather(buf, "forward iteration")
            decision = read_decision(comm, rows, setup_error, failure, "forward")
            if decision is None:
                return _finish(comm, order, offsets, finish, U, g, stats, FinishCause.NON_FINITE, "forward")
            g_new, worst = decision
            converged, remainder = record_iteration(stats, record, g, worst, previous, mode)
            if done(stats, converged, remainder, on_iteration, total, worst):
                return U
            w1 = min(max(g_new - lo, 0), m)
            x_in, new_last = fold(packing, rows, order, offsets, g_new, decided=False)
            if w1 < m:
                x = x_in[pos] if x_in[pos] is not None else torch.zeros_like(U[0])
                w1_t, g_t = torch.tensor(w1, device=device), torch.tensor(g_new - lo, device=device)
                U = apply(*self._apply_args(U, out, x, w1_t, g_t))
            if not last and g_new < hi:
                U[-1] = new_last[pos]
            if not first:
                p.halo = new_last[pos - 1].clone()
            if on_iteration is not None:
                on_iteration(stats.iterations, total if converged else g_new + 1, worst)
            if converged:
                stats.converged = True
                return U
            previous, g = worst, g_new
