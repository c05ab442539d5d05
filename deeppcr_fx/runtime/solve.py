"""``deeppcr.solve``: run a chain of L steps in parallel, with exact parallel gradients.

    z_l = step(z_{l-1}, *per_step[l-1], *shared)   for l = 1..L,   z_0 = x0

The forward pass is Newton (``newton.triangular_newton``) inside a custom
``torch.autograd.Function`` (no autograd through the iterations); the backward pass is
the linear adjoint (``adjoint.adjoint``). ``Config.backend`` decides whether the forward iterations,
full mode's adjoint and a sequential finish run as functions compiled by inductor instead
(``fused_solve``, ``fused``, ``backend``); the eager runtime is the reference and the fallback.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence

import torch

from ..results import Unsupported
from ..config import Config
from . import denormals, jacobians
from .modes import Mode, choose_mode, mode_of
from .adjoint import adjoint
from .newton import scaled_norm, triangular_newton
from .fused_solve import CompiledAdjoint, CompiledForward, constants_of
from .chain_io import SolveResult, bind_constants, check_length, stack_grads
from .state import StateSpec
from .stats import PassStats, SolveStats
from .steps import Steps, direct_call


def solve(step: Callable, x0, per_step: Sequence[torch.Tensor] = (), shared: Sequence[Any] = (),
          config: Optional[Config] = None, length: Optional[int] = None,
          on_iteration: Optional[Callable[[int, int, float], None]] = None,
          initial_guess: Optional[torch.Tensor] = None,
          replication: Optional[jacobians.ReplicationMemo] = None, group: Any = None, **options) -> SolveResult:
    """Compute the chain ``z_l = step(z_{l-1}, *per_step[l-1], *shared)`` for l = 1..L in parallel.

    Arguments:
        step: ``step(z, *per_step_slices, *shared) -> z_next``, a plain function of one step
            that returns the state's structure, shape and dtype.
        x0: the initial state: a floating tensor or a tuple of them.
        per_step: tensors with a leading dimension L; step l gets slice l.
        shared: values passed unchanged to every step (tensors are differentiable).
        config: a ``Config``; keyword ``options`` override its fields.
        length: L, needed only when there are no per-step tensors (a shared-weight chain).
        on_iteration: called as ``on_iteration(iteration, final_steps, worst_residual)`` after each
            forward Newton iteration (e.g. a progress bar).
        initial_guess: where Newton starts, in the flat layout (L, B, n) of ``SolveResult.solution``
            (default: x0 repeated). Any finite guess gives the same answer; a close one (the
            previous call's solution) saves iterations. Ignored if its shape, dtype or device differ.
        replication: a ``jacobians.ReplicationMemo`` that remembers across solves of one step
            whether it accepts a replicated batch (``PCRSolve`` passes its chain's); without one,
            a refusal is remembered only within this solve's forward and backward pass.
        group: a ``torch.distributed`` process group (e.g. ``dist.group.WORLD``): solve one chain
            split by depth over its ranks (layer-parallel, ``runtime/distributed.py``). Each rank
            passes its contiguous slice of the per-step tensors and gets its own states; ``x0``
            is read on the group's first rank; every rank must call ``solve`` (and ``backward``).

    Returns:
        ``SolveResult(states, stats, solution)``; ``states`` is differentiable w.r.t. x0, per-step
        and shared tensors. If Newton does not converge within ``max_iter`` or meets a
        non-finite value, the remaining steps run sequentially (exact), and ``stats`` says so.
    """
    if group is not None:
        from .distributed import solve_distributed
        return solve_distributed(step, x0, per_step, shared, config=config, length=length, on_iteration=on_iteration,
                                 initial_guess=initial_guess, group=group, **options)
    config = (config or Config()).replace(**options) if options else (config or Config())
    per_step = tuple(per_step)
    shared = tuple(shared) if isinstance(shared, (tuple, list)) else (shared,)
    length = check_length(per_step, length)
    spec = StateSpec.of(x0, config.batch)
    user_step = direct_call(step)
    step = bind_constants(user_step, len(per_step), shared)
    shared_tensors = tuple(s for s in shared if isinstance(s, torch.Tensor))
    steps = Steps(step, spec, per_step, shared_tensors, config.vectorize)
    with torch.no_grad():
        spec.check_step_output(steps.step(x0, *(p[0] for p in per_step), *shared_tensors))

    mode = mode_of(choose_mode(config.jacobian, spec.width, config.full_max_state, length * spec.batch_size))
    dtype = spec.dtypes[0]
    stats = SolveStats(length=length, width=spec.width, batch_size=spec.batch_size,
                       jacobian_requested=config.jacobian, jacobian=mode.name, dtype=str(dtype).replace("torch.", ""),
                       compute_dtype=str(spec.compute_dtype).replace("torch.", ""))
    x0_parts = x0 if isinstance(x0, tuple) else (x0,)
    if any(p.numel() == 0 for p in x0_parts):  # an empty batch: nothing to solve, the plain loop is exact and free
        return SolveResult(states=_plain_loop(steps, x0, length), stats=stats)
    problem = _Problem(steps, spec, config, mode, stats, len(x0_parts), on_iteration)
    problem.initial_guess = initial_guess
    if replication is not None:
        problem.replication = replication
    problem.compiled = CompiledForward(problem, user_step, constants_of(shared))
    outs = _ChainSolve.apply(problem, *x0_parts, *steps.inputs)
    steps.record(stats)
    return SolveResult(states=outs if spec.is_tuple else outs[0], stats=stats, solution=problem.solution)


def _plain_loop(steps: Steps, x0, length: int):
    """The sequential chain with autograd (for states without elements, e.g. a batch of 0 samples)."""
    z, states = x0, []
    for l in range(length):
        z = steps.step(z, *(p[l] for p in steps.per_step), *steps.shared)
        states.append(z)
    if isinstance(x0, tuple):
        return tuple(torch.stack(parts) for parts in zip(*states))
    return torch.stack(states)


class _Problem:
    """Everything the autograd Function needs besides the tensors."""

    def __init__(self, steps: Steps, spec: StateSpec, config: Config, mode: Mode, stats: SolveStats,
                 n_x0: int, on_iteration: Optional[Callable[[int, int, float], None]]) -> None:
        self.steps, self.spec, self.config, self.mode, self.stats, self.n_x0 = steps, spec, config, mode, stats, n_x0
        self.atol, self.rtol = config.tolerances(spec.compute_dtype)
        self.adjoint_atol, self.adjoint_rtol = config.adjoint_tolerances(spec.compute_dtype)
        self.on_iteration = on_iteration
        self.initial_guess: Optional[torch.Tensor] = None
        self.solution: Optional[torch.Tensor] = None
        self.replication = jacobians.ReplicationMemo()  # whether the step accepts a replicated batch
        self.compiled: Optional[CompiledForward] = None  # the compiled iteration, where the backend uses one

    def forward(self, x0_flat: torch.Tensor) -> torch.Tensor:
        steps, mode, length = self.steps, self.mode, self.stats.length
        jac = jacobians.Jacobians(mode)
        replicated = self.replicated_steps()

        def prev_states(start: int, U: torch.Tensor) -> torch.Tensor:
            first = x0_flat if start == 0 else U[start - 1]
            return torch.cat([first.unsqueeze(0), U[start:-1]])

        def evaluate(start: int, U: torch.Tensor):
            rep = None if replicated is None else replicated.batched(start, length)
            return jac(steps.batched(start, length), prev_states(start, U), rep)

        def finish(start: int, U: torch.Tensor) -> None:
            z = x0_flat if start == 0 else U[start - 1]
            for l in range(start, length):
                z = U[l] = steps.single(l, z)

        U = self._start(x0_flat)
        start = self._meet_guess(x0_flat, U) if self.stats.warm_start else 0
        solved = None if self.compiled is None else self.compiled.forward(x0_flat, U, start, finish)
        if solved is not None:
            self.solution = solved.detach()
            return solved
        t0 = time.perf_counter()
        triangular_newton(evaluate, finish, U, mode, self.atol, self.rtol,
                          self.config.iteration_cap(length), self.stats.forward, self.config.record_stats,
                          self.on_iteration, start=start)
        if self.compiled is not None:
            self.compiled.record_eager(time.perf_counter() - t0)
        self.stats.autodiff = "replicated" if replicated is not None and jac.replicate_error is None else jac.ad
        self.stats.autodiff_error = jac.rev_error
        self.stats.replicate_error = jac.replicate_error
        if jac.replicate_error is not None:  # later solves of this step go straight to the vmap'd pullback
            self.replication.accepts = False
        elif jac.replicate_used:
            self.replication.accepts = True
        self.solution = U.detach()
        return U

    def _meet_guess(self, x0_flat: torch.Tensor, U: torch.Tensor) -> int:
        """Run the first steps sequentially until a state meets the warm start's guess (within the
        tolerance), at most ``max_prefix(L)`` of them; returns how many rows are now final.

        A warm start's guess is another input's solution. Chains that forget their input
        (contractive ones, e.g. a tanh MLP at PyTorch's default init) reach the same
        trajectory after a few dozen steps: once the sequential state meets the guess, the
        guess's later rows are already the answer and Newton only has to confirm them (one
        batched residual). Where the trajectories never meet, this costs ``max_prefix(L)``
        sequential steps (<= L / 16) and Newton starts from there.
        """
        z = x0_flat
        for l in range(max_prefix(self.stats.length)):
            z_next = self.steps.single(l, z)
            met = bool(scaled_norm((z_next - U[l]).unsqueeze(0), z_next.unsqueeze(0), self.atol, self.rtol)[0] <= 1)
            z = U[l] = z_next
            if met:
                self.stats.forward.prefix, self.stats.forward.guess_met = l + 1, True
                return l + 1
        self.stats.forward.prefix, self.stats.forward.guess_met = max_prefix(self.stats.length), False
        return self.stats.forward.prefix

    def _start(self, x0_flat: torch.Tensor) -> torch.Tensor:
        """The initial iterate: a usable ``initial_guess`` (copied), else x0 repeated."""
        guess, length = self.initial_guess, self.stats.length
        if guess is not None and guess.shape == (length, *x0_flat.shape) and guess.dtype == x0_flat.dtype \
                and guess.device == x0_flat.device and bool(torch.isfinite(guess).all()):
            self.stats.warm_start = True
            return guess.clone()
        return x0_flat.unsqueeze(0).repeat(length, *([1] * x0_flat.dim()))

    def replicated_steps(self, steps: Optional[Steps] = None) -> Optional[Steps]:
        """The steps on a replicated batch for the Jacobians, where that is the faster method
        (``jacobians.replicates``) and the step has not refused one."""
        steps = steps or self.steps
        if not self.mode.linearised or self.replication.accepts is False \
                or not jacobians.replicates(self.spec.batch, self.spec.batch_size, self.spec.width, steps.sample_dims()):
            return None
        return steps.replicated(self.spec.width)


class _ChainSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, problem: _Problem, *tensors):
        x0_parts = tensors[:problem.n_x0]
        spec = problem.spec
        x0_flat = spec.flatten(x0_parts if spec.is_tuple else x0_parts[0])
        with torch.no_grad(), denormals.flushed(problem.config.flush_denormals):
            U = problem.forward(x0_flat)
        ctx.problem = problem
        ctx.save_for_backward(x0_flat, U, *tensors[problem.n_x0:])
        states = spec.unflatten(U, lead=1)
        return states if spec.is_tuple else (states,)

    @staticmethod
    def backward(ctx, *grads):
        if torch.is_grad_enabled():
            raise Unsupported(
                "double backward through deeppcr.solve is not supported (create_graph=True); "
                "differentiate the sequential model for higher-order gradients."
            )
        problem: _Problem = ctx.problem
        spec, steps, length = problem.spec, problem.steps, problem.stats.length
        x0_flat, U, *inputs = ctx.saved_tensors
        G = stack_grads(spec, grads, U)
        Zprev = torch.cat([x0_flat.unsqueeze(0), U[:-1]])
        wrt = [i for i, t in enumerate(inputs)
               if ctx.needs_input_grad[1 + problem.n_x0 + i] and t.is_floating_point()]
        # the saved inputs, and the per-step loop again if vmap failed in the forward pass
        backward_steps = Steps(steps.step, spec, inputs[:len(steps.per_step)], inputs[len(steps.per_step):],
                               steps.vectorize if steps.vectorized else False)
        problem.stats.backward = PassStats()
        cfg = problem.config
        # torch.func transforms differentiate regardless of the ambient no_grad mode.
        compiled = None if problem.compiled is None else CompiledAdjoint(problem, problem.compiled)
        with denormals.flushed(cfg.flush_denormals):
            grads = None if compiled is None else compiled(backward_steps, Zprev, G, wrt)
            if grads is None:
                t0 = time.perf_counter()
                grads = adjoint(backward_steps, Zprev, G, wrt, problem.mode,
                                problem.adjoint_atol, problem.adjoint_rtol,
                                cfg.iteration_cap(length), problem.stats.backward,
                                problem.replicated_steps(backward_steps))
                if compiled is not None:
                    compiled.record_eager(time.perf_counter() - t0)
        dZprev, *dinputs = grads
        backward_steps.record(problem.stats)  # vmap can fail in the backward pass alone
        dx0 = spec.unflatten(dZprev[0])
        dx0 = dx0 if spec.is_tuple else (dx0,)
        input_grads: list = [None] * len(inputs)
        for i, d in zip(wrt, dinputs):
            input_grads[i] = d
        return (None, *dx0, *input_grads)


def max_prefix(length: int) -> int:
    """Most sequential steps a warm start runs to meet its guess: L / 16, at most 64."""
    return min(64, length // 16)
