"""The glue between ``solve`` and the compiled iteration: pick the backend, build or reuse the
compiled ``NewtonIteration`` for this step and signature, run it, finish sequentially if needed.

``forward(...)`` returns the solved iterate, or None when this solve runs eagerly (the caller then
runs ``newton.triangular_newton`` and reports the eager seconds back with ``record_eager``).
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from ..results import FinishCause
from . import backend, cloop, rowloop
from .fused import (CONVERGED, NON_FINITE, FullAdjoint, NewtonIteration, RowFullAdjoint, RowNewtonIteration,
                    SequentialChunk, finish_args, finish_chunk, run_finish, run_newton)
from .newton import _finish


# Whether the compiled forward's linearise runs as ``rowloop``'s C++ loop where it can (CPU, full or diag
# mode, a step the generator translates); False: always the one inductor graph (benchmarks compare both).
ROW_LOOP = True


class CompiledForward:
    """One solve's view of the compiled-iteration cache (see ``backend``)."""

    # Rows per chunk of the compiled scan; 0: odd-even cyclic reduction (``fused_scan``), work-efficient at
    # every length. Against plain PCR and PCR across 16-row chunks, tanh MLP w = 4 (cold cache, load ~5):
    # L = 4096 2.8 ms per iteration vs 5.2 / 2.7, first call 13.1 s vs 17.6 / 26.7 s; L = 16384 6.9 ms vs
    # 13.0 / 7.2, 12.7 s vs 19.1 / 27.6 s (benchmarks/results/scans_cpu.txt). The chunked scan stays for
    # layer-parallel slices (``fused.fused_chunk``), which reuse its running products.
    chunk = 0

    def __init__(self, problem, user_step: Callable, constants: tuple) -> None:
        self.problem = problem
        p = problem
        steps = p.steps
        self.key = ("newton", p.mode.name, p.spec, p.atol, p.rtol, p.stats.length, self.chunk, constants,
                    backend.tensor_signature(steps.inputs), len(steps.per_step), p.config.cuda_graphs)
        self.user_step = user_step
        self.entry: Optional[backend.Entry] = None

    def forward(self, x0_flat: torch.Tensor, U: torch.Tensor, start: int, finish: Callable) -> Optional[torch.Tensor]:
        p, cfg = self.problem, self.problem.config
        if cfg.backend == "eager" or p.steps.vectorize is False or p.steps.vmap_error is not None \
                or _tracing():
            return None
        device = x0_flat.device
        self.entry = backend.entry(self.user_step, self.key + (device.type,))
        if self.entry is None:
            p.stats.backend_error = "the step or a non-tensor shared value cannot be a cache key"
            return None
        if not backend.use_compiled(cfg.backend, self.entry, device, chunked=self.chunk > 0):
            p.stats.backend_error = self.entry.error
            return None
        cuda_graphs = cfg.cuda_graphs and device.type == "cuda"
        inputs = tuple(p.steps.inputs)
        state = _initial_state(U, start)
        if self.entry.fn is None:
            t0 = time.perf_counter()
            if self._build(x0_flat, U, state, inputs, cuda_graphs) is None:
                p.stats.backend_error = self.entry.error
                return None
            p.stats.compile_s = time.perf_counter() - t0
        p.stats.backend = "inductor"
        # under CUDA graphs backend.DirectCall already returns copies of a replay's outputs: no clone here
        U, status, first = run_newton(self.entry.fn, U, x0_flat, inputs, start, cfg.iteration_cap(p.stats.length),
                                      cfg.checks_every(device), p.stats.forward, cfg.record_stats, p.on_iteration)
        p.stats.forward.jacobian, p.stats.forward.backend = p.mode.name, "inductor"
        self._record_linearise(device)
        if status == CONVERGED:
            p.stats.forward.converged = True
        else:
            _finish(lambda lo, U: self._finish(lo, U, x0_flat, finish, cuda_graphs), first, U, p.stats.forward,
                    FinishCause.NON_FINITE if status == NON_FINITE else FinishCause.MAX_ITER)
        return U

    def _record_linearise(self, device: torch.device) -> None:
        f = self.problem.stats.forward
        f.linearise_backend = getattr(self.entry.fn, "linearise_backend", "inductor")
        if f.linearise_backend != "rows":
            found = backend.entry(self.user_step, ("rows",) + self.key + (device.type,))
            f.linearise_error = found.error if found is not None else None

    def _finish(self, start: int, U: torch.Tensor, x0_flat: torch.Tensor, eager: Callable, cuda_graphs: bool) -> None:
        """The sequential finish: on CPU one call of a generated C++ loop (``cloop``), else (or where the
        step is outside its op set) ``finish_chunk(L)`` steps per call of a compiled function, else eager.
        ``stats.forward.finish_backend`` says which ran, ``finish_error`` why the C++ loop did not."""
        p = self.problem
        steps, length, f = p.steps, p.stats.length, p.stats.forward
        chunk = finish_chunk(length)
        short = length - start <= chunk  # one chunk's worth: not worth a compile, but a compiled loop runs it
        if U.device.type == "cpu" and self._cloop(start, U, x0_flat, compile=not short):
            f.finish_backend = "cloop"
            return None
        if short:
            f.finish_backend = "eager"
            return eager(start, U)
        found = backend.entry(self.user_step, ("finish", chunk) + self.key + (U.device.type,))
        if found is not None and found.fn is None and found.error is None:
            z = x0_flat if start == 0 else U[start - 1]
            fn = SequentialChunk(steps.step, p.spec, len(steps.per_step), chunk)
            backend.build(found, fn, finish_args(z, steps.per_step, steps.shared, start, chunk), cuda_graphs)
        if found is None or found.fn is None:
            f.finish_backend = "eager"
            return eager(start, U)
        f.finish_backend = "inductor"
        run_finish(found.fn, chunk, start, U, x0_flat, steps.per_step, steps.shared)

    def _cloop(self, start: int, U: torch.Tensor, x0_flat: torch.Tensor, compile: bool = True) -> bool:
        """Run the finish as the step's C++ loop (generated and compiled on first use unless ``compile`` is
        False, cached like the other entries); False where it cannot be (the reason in
        ``stats.forward.finish_error``)."""
        p = self.problem
        steps = p.steps
        found = backend.entry(self.user_step, ("cloop",) + self.key + ("cpu",), create=compile)
        if found is None:
            return False
        if found.fn is None and found.error is None and compile:
            t0 = time.perf_counter()
            try:
                found.fn = cloop.compile_loop(steps.step, p.spec, steps.per_step, steps.shared, x0_flat)
                found.compile_s = time.perf_counter() - t0
            except Exception as exc:  # noqa: BLE001 - any failure to translate or compile: the inductor chunks
                found.error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"
        p.stats.forward.finish_error = found.error
        if found.fn is None or not U.is_contiguous() or U.dtype != x0_flat.dtype:
            return False
        found.fn(start, U, x0_flat, steps.per_step, steps.shared)
        return True

    def _build(self, x0_flat, U, state, inputs, cuda_graphs):
        """Compile the iteration: on CPU, where ``rowloop`` translates the step (``ROW_LOOP``), its C++ row loop
        plus the compiled rest (``rowloop.RowCall``), else the one graph with the vmap'd linearise."""
        p = self.problem
        rows = self._rows(x0_flat, U) if ROW_LOOP else None
        cls = RowNewtonIteration if rows is not None else NewtonIteration
        it = cls(p.steps.step, p.spec, len(p.steps.per_step), len(p.steps.shared), p.mode, p.atol, p.rtol, self.chunk)
        if rows is None:
            return backend.build(self.entry, it, (U, x0_flat, *state, *inputs), cuda_graphs)
        call = rowloop.RowCall(rows, None, len(p.steps.per_step))
        out = backend.build(self.entry, it, (U, *state, *call.linearise(U, x0_flat, inputs)), cuda_graphs)
        if out is not None:
            call.graph, self.entry.fn = self.entry.fn, call
        return out

    def _rows(self, x0_flat, U) -> Optional[rowloop.RowLoop]:
        """The compiled row loop for this signature, or None where it cannot be (why: in the ("rows", ...)
        cache entry's error, reported as ``stats.forward.linearise_error``)."""
        p = self.problem
        found = backend.entry(self.user_step, ("rows",) + self.key + (U.device.type,))
        if found is None or U.device.type != "cpu" or not p.mode.linearised:
            return None
        if found.fn is None and found.error is None:
            t0 = time.perf_counter()
            try:
                found.fn = rowloop.compile_rows(p.steps.step, p.spec, p.mode, p.steps.per_step, p.steps.shared,
                                                x0_flat)
                found.compile_s = time.perf_counter() - t0
            except Exception as exc:  # noqa: BLE001 - any failure to translate or compile: the one-graph iteration
                found.error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"
        return found.fn

    def record_eager(self, seconds: float) -> None:
        if self.entry is not None:
            self.entry.eager_s += seconds


class CompiledAdjoint:
    """The backward pass of a chain in an exact mode (full) as one compiled function (``fused.FullAdjoint``),
    chosen by the same rule as the forward (its own cache entry and eager-time account)."""

    def __init__(self, problem, compiled_forward: CompiledForward) -> None:
        self.problem, self.forward = problem, compiled_forward
        self.entry: Optional[backend.Entry] = None

    def __call__(self, steps, Zprev: torch.Tensor, G: torch.Tensor, wrt: list) -> Optional[tuple]:
        """``(dZprev, *dinputs)`` as ``adjoint.adjoint`` returns them, or None: run the eager adjoint."""
        p, cfg = self.problem, self.problem.config
        if not p.mode.exact or cfg.backend == "eager" or not steps.vectorized or _tracing():
            return None
        device = Zprev.device
        key = ("adjoint", tuple(wrt), p.adjoint_atol, p.adjoint_rtol) + self.forward.key + (device.type,)
        self.entry = backend.entry(self.forward.user_step, key)
        chunked = self.forward.chunk > 0
        if self.entry is None or not backend.use_compiled(cfg.backend, self.entry, device, chunked=chunked):
            return None
        args = (Zprev, G, *steps.inputs)
        if self.entry.fn is None:
            out = self._build(steps, Zprev, args, wrt, cfg.cuda_graphs and device.type == "cuda")
        else:
            out = self.entry.fn(*args)
        if out is None or not bool(out[0]):  # not compiled, or samples coupled: the eager adjoint iterates
            return None
        b = p.stats.backward
        b.iterations, b.converged, b.jacobian, b.backend = 1, True, p.mode.name, "inductor"
        b.linearise_backend = getattr(self.entry.fn, "linearise_backend", "inductor")
        return tuple(out[1:])

    def _build(self, steps, Zprev, args, wrt, cuda_graphs):
        """Compile the adjoint: on CPU with the forward's row loop for its Jacobians where there is one
        (``rowloop.AdjointRowCall``), else the one graph."""
        p = self.problem
        rows = self.forward._rows(Zprev[0], Zprev) if ROW_LOOP else None
        cls = RowFullAdjoint if rows is not None else FullAdjoint
        fn = cls(steps.step, p.spec, len(steps.per_step), len(steps.shared), tuple(wrt), p.mode,
                 p.adjoint_atol, p.adjoint_rtol, self.forward.chunk)
        if rows is None:
            return backend.build(self.entry, fn, args, cuda_graphs)
        call = rowloop.AdjointRowCall(rows, None, len(steps.per_step))
        out = backend.build(self.entry, fn, (Zprev, args[1], call.jacobians(Zprev, args[2:]), *args[2:]),
                            cuda_graphs)
        if out is not None:
            call.graph, self.entry.fn = self.entry.fn, call
        return out

    def record_eager(self, seconds: float) -> None:
        if self.entry is not None:
            self.entry.eager_s += seconds


def _tracing() -> bool:
    """Inside a TorchDynamo or torch.jit trace: compiling a function of our own there is not ours to do."""
    return torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None


def _initial_state(U: torch.Tensor, start: int) -> tuple:
    device = U.device
    return (torch.tensor(start, device=device), torch.tensor(float("inf"), dtype=U.dtype, device=device),
            torch.tensor(0, dtype=torch.int8, device=device), torch.tensor(0, device=device))


def constants_of(shared: tuple) -> tuple:
    """The non-tensor shared values (baked into a traced graph, so part of its key)."""
    return tuple((i, s) for i, s in enumerate(shared) if not isinstance(s, torch.Tensor))

