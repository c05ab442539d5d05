"""Layer-parallel ``deeppcr.solve``: one chain split by depth over the ranks of a process group.

    res = deeppcr.solve(step, x0, per_step=(W_local, b_local), shared=(...), group=dist.group.WORLD)

Group rank r holds steps ``[start_r, end_r)``: its contiguous slice of every per-step tensor
(slices may differ in length; each holds at least one step; ``length=`` gives the local
length of a chain without per-step tensors). ``res.states`` are this rank's states
``z_{start_r+1} .. z_{end_r}``; ``x0`` is read on the group's first rank (elsewhere pass a
tensor of the same structure, whose values are ignored, or None). Gradients reach each rank's
per-step tensors, ``x0`` on the first rank, and shared tensors (summed over ranks, as DDP
does). Stats are the same on every rank. Every rank must call ``solve`` with the same options
and, for gradients, call ``backward`` through its states (a zero gradient where its loss does
not use them): the solve's collectives pair up across ranks. A rank none of whose inputs
requires grad still gets differentiable states when another rank needs gradients, so it can
take part. ``runtime/distributed_model.LayerParallel`` wraps all this for a model of blocks.

How (DESIGN.md section 5): the setup is one tensor all-gather (``distributed_setup``: layout check,
x0, warm starts; pickled facts only when something differs). ``distributed_newton`` is
``newton.triangular_newton`` with global decisions and ONE all-gather per Newton iteration: each
rank packs its check (first unconverged row, worst ratio, a flag), its last row and that row's
step value, and its map for the cross-rank affine scan (``distributed_scan``); the next rank's halo
follows from those numbers, so no separate halo exchange. The first rank in logical order scans
before the exchange (its map is its last row), the last one after it, so with two ranks their
scans overlap the other's evaluation. A second exchange of the same size happens only in an
iteration that checked first (or sent maps of the last Jacobians) and did not converge. Elements
gathered per exchange: ``P (3 + 3 B n)`` with P = 2 (no matrix travels: the first rank's input is
zero, the last rank's output is nobody's); ``P (3 + 4 B n + 2 A)`` with P > 2 (the middle ranks
send two maps, A = B n^2 in ``full``, B n in ``diag``, 0 otherwise). Independent of L. The adjoint
(``distributed_adjoint``) in ``full`` mode: one scan exchange (every rank scans before it; the
later ones add their input after it with two batched products) and one check of
``P (1 + 3 B n)`` elements; in the other modes the same Newton driver in reverse rank order, plus
a halo exchange of ``P B n`` per iteration.

Backend (``Config.backend``): with ``"inductor"`` (or ``"auto"`` once it compiles) and at most two
ranks, each rank's forward iteration runs as two compiled functions around the exchange
(``distributed_fused``); the ranks agree on it through a vote in the setup exchange where every rank
already holds its compiled halves for the layout, else in one small all-gather (none with
``backend="eager"``), and a compile failure on any rank makes every rank eager with the same
``stats.backend_error``. After a compiled forward, the backward pass in ``full`` mode is compiled
too (``distributed_fused_adjoint``; the eager adjoint below where its check fails).

Faults: the setup exchange checks that the ranks describe one chain (state structure, per-step
and shared shapes and dtypes, options), and the first Newton exchange that each rank's first step
ran; any problem raises ``DistributedLayoutError`` / ``DistributedSolveError`` on every rank. A collective that
fails (a rank died; a rank did not call in, so the process group's ``timeout`` expired) raises
``DistributedSolveError`` naming the operation. Use a process-group timeout you can afford to wait.
An exception in the step (or its derivative) on one rank in the middle of the solve or its
backward pass is carried as a flag in the next exchange: that rank raises its own exception and
the others ``PeerFailure`` (a ``DistributedSolveError``) at the same point, and the group stays
usable. Exceptions outside the step's code (in the library, out of memory in a scan) propagate on
their rank only; the others then fail when that process exits or the group's timeout expires.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from ..config import Config
from . import jacobians
from .distributed_adjoint import adjoint_distributed
from ..results import DistributedLayoutError, DistributedSolveError, PeerFailure
from .distributed_comm import Comm
from .distributed_fused import CompiledRank, remember_layout, vote, voted
from .distributed_fused_adjoint import compiled_adjoint
from .distributed_newton import distributed_newton
from .fused_solve import constants_of
from .modes import Mode, choose_mode, mode_of
from .distributed_setup import setup
from . import steps as steps_module
from .chain_io import SolveResult, bind_constants, check_length, stack_grads
from .state import StateSpec
from .stats import PassStats, SolveStats
from .steps import Steps

__all__ = ["DistributedLayoutError", "DistributedSolveError", "DistributedSolveResult", "PeerFailure",
           "solve_distributed"]


@dataclass
class DistributedSolveResult(SolveResult):
    """A ``SolveResult`` for this rank's slice. ``offsets``: the first step of every rank and the
    chain length (rank r holds steps offsets[r]..offsets[r+1]-1); ``rank``: this rank in the group;
    ``volume``: elements this rank received through collectives in the forward solve."""

    offsets: tuple = ()
    rank: int = 0
    volume: int = 0


def solve_distributed(step: Callable, x0, per_step: Sequence[torch.Tensor] = (), shared: Sequence[Any] = (),
                      config: Optional[Config] = None, length: Optional[int] = None,
                      on_iteration: Optional[Callable[[int, int, float], None]] = None,
                      initial_guess: Optional[torch.Tensor] = None, group: Any = None,
                      **options) -> DistributedSolveResult:
    """``deeppcr.solve(..., group=group)``: see the module docstring. ``initial_guess``: this rank's
    rows (m, B, n) of a previous ``solution``."""
    comm = Comm(group)
    per_step = tuple(per_step)
    shared = tuple(shared) if isinstance(shared, (tuple, list)) else (shared,)
    config, facts, error = None, None, None
    try:
        config = (config or Config()).replace(**options) if options else (config or Config())
        facts = _local_facts(x0, per_step, shared, length, config, comm.rank == 0)
    except Exception as exc:  # reported on every rank below
        error = f"{type(exc).__name__}: {exc}"
    device = _device(x0, per_step, shared)
    direct_call = getattr(steps_module, "direct_call", lambda f: f)  # skips torch.fx's error print
    user_step = direct_call(step)
    shared_tensors = tuple(s for s in shared if isinstance(s, torch.Tensor))
    ballot = () if config is None or config.backend == "eager" else \
        vote(comm, config, user_step, constants_of(shared), per_step + shared_tensors, len(per_step), device)
    layout = setup(comm, facts, error, x0, initial_guess, device, _raise_if_any, _check_layout, ballot)
    spec, lengths = layout.spec, layout.lengths
    remember_layout(comm, spec, lengths)
    offsets = [0]
    for n_steps in lengths:
        offsets.append(offsets[-1] + n_steps)
    total = offsets[-1]
    x0_flat = layout.x0_flat
    if comm.rank == 0:
        x0_parts = x0 if isinstance(x0, tuple) else (x0,)
    else:  # placeholders: x0 is read on the first rank only
        x0_parts = tuple(torch.zeros(s, dtype=d, device=device) for s, d in zip(spec.shapes, spec.dtypes))

    step = bind_constants(user_step, len(per_step), shared)
    steps = Steps(step, spec, per_step, shared_tensors, config.vectorize)
    setup_error = None  # carried by the first exchange of the forward solve: every rank raises there
    try:
        with torch.no_grad():
            spec.check_step_output(steps.step(spec.unflatten(x0_flat), *(p[0] for p in per_step), *shared_tensors))
    except Exception as exc:
        setup_error = f"{type(exc).__name__}: {exc}"
    if config.iteration_cap(total) < 1:  # no iteration to carry it
        _raise_if_any(comm.gather_objects(setup_error, "first step check"), "the first step check", comm)

    mode = mode_of(choose_mode(config.jacobian, spec.width, config.full_max_state, total * spec.batch_size))
    stats = SolveStats(length=total, width=spec.width, batch_size=spec.batch_size,
                       jacobian_requested=config.jacobian, jacobian=mode.name,
                       dtype=str(spec.dtypes[0]).replace("torch.", ""),
                       compute_dtype=str(spec.compute_dtype).replace("torch.", ""))
    stats.warm_start = all(layout.warm)
    problem = _Problem(comm, steps, spec, config, mode, stats, lengths, x0_flat, on_iteration)
    problem.shared_wrt = [len(per_step) + i for i, rg in enumerate(layout.shared_grad) if rg]
    problem.initial_guess = initial_guess if layout.warm[comm.rank] else None
    problem.setup_error = setup_error
    problem.compiled = CompiledRank(problem, user_step, constants_of(shared))
    problem.compiled.voted = voted(layout.extra, spec, lengths)
    if comm.rank > 0:  # the state before this rank's first step: the previous rank's initial last row
        problem.halo = layout.guess_lasts[comm.rank - 1] if layout.warm[comm.rank - 1] else x0_flat
    # A rank with nothing to differentiate still takes part in the backward pass when another rank
    # has something: a dummy input makes its states differentiable, so its loss.backward() runs.
    extra = (torch.zeros((), device=device, requires_grad=True),) \
        if not layout.needs_grad[comm.rank] and any(layout.needs_grad) else ()
    problem.n_extra = len(extra)
    outs = _DistChainSolve.apply(problem, *x0_parts, *steps.inputs, *extra)
    _record_vectorized(steps, stats)
    return DistributedSolveResult(states=outs if spec.is_tuple else outs[0], stats=stats, solution=problem.solution,
                                  offsets=tuple(offsets), rank=comm.rank, volume=problem.forward_volume)


# --- setup: what each rank holds, and whether the ranks agree -----------------------------------
def _local_facts(x0, per_step: tuple, shared: tuple, length: Optional[int], config: Config, first: bool) -> dict:
    if any(isinstance(p, torch.Tensor) and p.dim() > 0 and p.shape[0] == 0 for p in per_step) or length == 0:
        raise ValueError("this rank's slice of the chain is empty; every rank of the group needs at least one step "
                         "(use a group of fewer ranks for a shorter chain).")
    n_steps = check_length(per_step, length)
    spec = None if x0 is None else StateSpec.of(x0, config.batch)
    return {
        "length": n_steps,
        "spec": spec,
        "per_step": [(tuple(p.shape[1:]), p.dtype) for p in per_step],
        "shared": [(tuple(s.shape), s.dtype) if isinstance(s, torch.Tensor) else ("value", type(s).__name__)
                   for s in shared],
        "shared_grad": [s.requires_grad for s in shared if isinstance(s, torch.Tensor)],
        "options": {**{k: getattr(config, k, None) for k in ("jacobian", "max_iter", "atol", "rtol", "adjoint_atol",
                                                             "adjoint_rtol", "batch", "full_max_state",
                                                             "backend")},
                    "grad_enabled": torch.is_grad_enabled()},  # a backward pass needs every rank
        # whether this rank's inputs make the states differentiable (x0 counts on the first rank only)
        "needs_grad": torch.is_grad_enabled() and any(
            t.requires_grad for t in per_step + tuple(s for s in shared if isinstance(s, torch.Tensor))
            + ((x0 if isinstance(x0, tuple) else (x0,)) if x0 is not None and first else ())),
    }


def _raise_if_any(errors: list, what: str, comm: Comm) -> None:
    bad = [(r, e) for r, e in enumerate(errors) if e is not None]
    if bad:
        lines = "; ".join(f"rank {r}: {e}" for r, e in bad)
        raise DistributedSolveError(f"deeppcr.solve(group=...) failed during {what} on rank(s) "
                                    f"{[r for r, _ in bad]} of {comm.size}: {lines}")


def _check_layout(facts: list, comm: Comm) -> tuple:
    """The first rank's state spec and every rank's slice length, after checking that the ranks agree."""
    first = facts[0]
    if first["spec"] is None:
        raise DistributedLayoutError("deeppcr.solve(group=...): x0 is None on the group's first rank, "
                                     "where the initial state is read; pass it there.")
    problems = []
    for r, f in enumerate(facts[1:], start=1):
        if f["spec"] is not None and f["spec"] != first["spec"]:
            problems.append(f"rank {r}'s x0 (shapes {list(f['spec'].shapes)}, dtypes {list(f['spec'].dtypes)}) "
                            f"differs from rank 0's (shapes {list(first['spec'].shapes)}, dtypes "
                            f"{list(first['spec'].dtypes)})")
        for key, name in (("per_step", "per-step tensors (shape after the step dimension, dtype)"),
                          ("shared", "shared inputs (shape, dtype)"), ("options", "options")):
            if f[key] != first[key]:
                problems.append(f"rank {r}'s {name} {f[key]} differ from rank 0's {first[key]}")
    if problems:
        raise DistributedLayoutError("deeppcr.solve(group=...): the ranks' slices do not describe one chain: "
                                     + "; ".join(problems) + ". Every rank must pass the same state structure, "
                                     "per-step and shared shapes and options; only the number of steps may differ.")
    return first["spec"], [f["length"] for f in facts]


def _record_vectorized(steps: Steps, stats: SolveStats) -> None:
    stats.vectorized = stats.vectorized and steps.vectorized
    if stats.vmap_error is None:
        stats.vmap_error = steps.vmap_error


def _device(x0, per_step: tuple, shared: tuple) -> torch.device:
    parts = (x0 if isinstance(x0, tuple) else () if x0 is None else (x0,)) + per_step + \
        tuple(s for s in shared if isinstance(s, torch.Tensor))
    return parts[0].device if parts else torch.device("cpu")


# --- the solve -----------------------------------------------------------------------------
class _Problem:
    """Everything the autograd Function needs besides the tensors."""

    def __init__(self, comm: Comm, steps: Steps, spec: StateSpec, config: Config, mode: Mode, stats: SolveStats,
                 lengths: list, x0_flat: torch.Tensor, on_iteration) -> None:
        self.comm, self.steps, self.spec, self.config, self.mode, self.stats = comm, steps, spec, config, mode, stats
        self.lengths, self.x0_flat, self.on_iteration = lengths, x0_flat, on_iteration
        self.replication_refused = False  # the step refused a replicated batch (not asked again)
        self.atol, self.rtol = config.tolerances(spec.compute_dtype)
        self.adjoint_atol, self.adjoint_rtol = config.adjoint_tolerances(spec.compute_dtype)
        self.n_x0 = len(spec.shapes)
        self.initial_guess: Optional[torch.Tensor] = None
        self.solution: Optional[torch.Tensor] = None
        self.shared_wrt: list = []
        self.n_extra = 0  # trailing dummy inputs (see solve_distributed)
        self.forward_volume = 0
        self.halo: Optional[torch.Tensor] = x0_flat  # the state before this rank's first step
        self.setup_error: Optional[str] = None
        self.compiled: Optional[CompiledRank] = None  # the compiled halves of an iteration (Config.backend)

    def forward(self, x0_flat: torch.Tensor) -> torch.Tensor:
        comm, steps, mode, m = self.comm, self.steps, self.mode, self.lengths[self.comm.rank]
        jac = jacobians.Jacobians(mode)
        replicated = self.replicated_steps()
        if comm.rank == 0:
            self.halo = x0_flat

        def handoff(h: torch.Tensor) -> None:
            self.halo = h.clone()

        def evaluate(w0: int, U: torch.Tensor):
            if w0 == m:
                return U[m:], lambda: (None, None)
            prev = torch.cat([(self.halo if w0 == 0 else U[w0 - 1]).unsqueeze(0), U[w0:-1]])
            rep = None if replicated is None else replicated.batched(w0, m)
            vals, jfn = jac(steps.batched(w0, m), prev, rep)
            return vals, lambda: (jfn(), None)

        def finish(w0: int, U: torch.Tensor, incoming: Optional[torch.Tensor]) -> torch.Tensor:
            if incoming is not None:
                self.halo = incoming.clone()
            z = self.halo if w0 == 0 else U[w0 - 1]
            for l in range(w0, m):
                z = U[l] = steps.single(l, z)
            return U[-1]

        if self.initial_guess is not None:
            U = self.initial_guess.clone()
        else:
            U = x0_flat.unsqueeze(0).repeat(m, *([1] * x0_flat.dim()))
        if self.compiled is not None and self.compiled.agree(U, self.halo, self.setup_error):
            volume0 = comm.volume  # the agreement is not the solve's communication
            U = self.compiled.solve(U, tuple(steps.inputs), finish, self.config.iteration_cap(sum(self.lengths)),
                                    self.config.record_stats, self.on_iteration, self.setup_error)
            self.solution = U.detach()
            self.forward_volume = comm.volume - volume0
            return U
        volume0 = comm.volume
        order = list(range(comm.size))
        offsets = [0]
        for n_steps in self.lengths:
            offsets.append(offsets[-1] + n_steps)
        t0 = time.perf_counter()
        distributed_newton(comm, order, offsets, evaluate, finish, U, mode, self.atol, self.rtol,
                           self.config.iteration_cap(offsets[-1]), self.stats.forward, self.config.record_stats,
                           self.on_iteration, what="forward", handoff=handoff, setup_error=self.setup_error)
        if self.compiled is not None:
            self.compiled.record_eager(time.perf_counter() - t0)
        self.stats.autodiff = "replicated" if replicated is not None and jac.replicate_error is None else jac.ad
        self.stats.autodiff_error, self.stats.replicate_error = jac.rev_error, jac.replicate_error
        self.replication_refused = jac.replicate_error is not None
        self.solution = U.detach()
        self.forward_volume = comm.volume - volume0
        return U

    def replicated_steps(self, steps: Optional[Steps] = None) -> Optional[Steps]:
        steps = steps or self.steps
        n, B = self.spec.width, self.spec.batch_size
        if not self.mode.linearised or self.replication_refused:
            return None
        if hasattr(jacobians, "replicates"):
            ok = jacobians.replicates(self.spec.batch, B, n, steps.sample_dims())
        else:
            ok = n * B <= jacobians.REPLICATE_MAX_SAMPLES
        return steps.replicated(n) if ok else None


class _DistChainSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, problem: _Problem, *tensors):
        spec = problem.spec
        if problem.comm.rank == 0:
            x0_parts = tensors[:problem.n_x0]
            x0_flat = spec.flatten(x0_parts if spec.is_tuple else x0_parts[0])
        else:
            x0_flat = problem.x0_flat
        with torch.no_grad():
            U = problem.forward(x0_flat)
        ctx.problem = problem
        ctx.save_for_backward(problem.halo, U, *tensors[problem.n_x0:len(tensors) - problem.n_extra])
        states = spec.unflatten(U, lead=1)
        return states if spec.is_tuple else (states,)

    @staticmethod
    def backward(ctx, *grads):
        if torch.is_grad_enabled():
            raise NotImplementedError(
                "double backward through deeppcr.solve is not supported (create_graph=True); "
                "differentiate the sequential model for higher-order gradients.")
        problem: _Problem = ctx.problem
        comm, spec, steps = problem.comm, problem.spec, problem.steps
        halo, U, *inputs = ctx.saved_tensors
        G = stack_grads(spec, grads, U)
        Zprev = torch.cat([halo.unsqueeze(0), U[:-1]])
        n_ps = len(steps.per_step)
        wrt = [i for i in range(n_ps) if ctx.needs_input_grad[1 + problem.n_x0 + i] and inputs[i].is_floating_point()]
        wrt += [i for i in problem.shared_wrt if inputs[i].is_floating_point()]
        backward_steps = Steps(steps.step, spec, inputs[:n_ps], inputs[n_ps:],
                               steps.vectorize if steps.vectorized else False)
        problem.stats.backward = PassStats()
        fused = None if problem.compiled is None else compiled_adjoint(problem, backward_steps, Zprev, G, wrt)
        dZprev, *dinputs = fused if fused is not None else adjoint_distributed(
            comm, problem.lengths, backward_steps, Zprev, G, wrt, problem.mode, problem.adjoint_atol, problem.adjoint_rtol,
            problem.config.iteration_cap(sum(problem.lengths)), problem.stats.backward,
            problem.replicated_steps(backward_steps))
        _record_vectorized(backward_steps, problem.stats)
        dinputs = list(dinputs)
        shared_pos = [k for k, i in enumerate(wrt) if i >= n_ps]
        if shared_pos:  # shared tensors: one all-reduce of all their gradients, summed over ranks
            flat = torch.cat([dinputs[k].reshape(-1) for k in shared_pos])
            flat = comm.all_reduce_sum(flat, "shared gradients")
            for k, piece in zip(shared_pos, flat.split([dinputs[k].numel() for k in shared_pos])):
                dinputs[k] = piece.view_as(dinputs[k])
        if comm.rank == 0:
            dx0 = spec.unflatten(dZprev[0])
            dx0 = dx0 if spec.is_tuple else (dx0,)
        else:
            dx0 = (None,) * problem.n_x0
        input_grads: list = [None] * len(inputs)
        for i, d in zip(wrt, dinputs):
            if ctx.needs_input_grad[1 + problem.n_x0 + i]:
                input_grads[i] = d
        return (None, *dx0, *input_grads, *([None] * problem.n_extra))
