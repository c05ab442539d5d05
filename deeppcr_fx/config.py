"""Every option of deeppcr_fx, in one documented, immutable dataclass.

Options are passed down explicitly (no global state). ``Config.replace(**kw)`` returns
a copy with some fields changed; unknown names raise ``InvalidInput`` (a ``TypeError``) naming the field.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from .results import InvalidInput

JACOBIAN_MODES = ("auto", "full", "diag", "identity", "zero")
POLICIES = ("auto", "always", "never")
BACKENDS = ("auto", "eager", "inductor")

# Default convergence tolerances per *compute* dtype, forward and adjoint alike:
# ||r_{l,b}|| <= atol + rtol * ||u_{l,b}|| (max norm over one sample's state at one row) for the
# residual r_l of row l of the state (forward) or cotangent (adjoint) u. Relative: atol is only
# the dtype's smallest normal number, a floor below which everything is round-off. float32: rtol
# ~8 ulp, above the round-off of re-evaluating a step with batched kernels; float64: ~5e5 ulp.
_DEFAULT_TOLERANCES = {
    torch.float64: (torch.finfo(torch.float64).tiny, 1e-10),
    torch.float32: (torch.finfo(torch.float32).tiny, 1e-6),
}


@dataclass(frozen=True)
class Config:
    """Options of the solver (``deeppcr.solve``) and of the compiler (``deeppcr.compile``).

    Solver
    ------
    jacobian:
        How each Newton step linearises a step function ``f``: ``"full"`` (dense
        per-sample Jacobian, exact Newton, quadratic convergence), ``"diag"`` (its
        diagonal, quasi-Newton), ``"identity"`` (``J = I``: Picard iteration, a cumulative
        sum), ``"zero"`` (``J = 0``: Jacobi fixed-point iteration) or ``"auto"``: ``"full"``
        when the per-sample state has at most ``full_max_state`` elements and all L * B
        Jacobians together at most 2^26 elements, otherwise ``"identity"`` (see
        ``deeppcr_fx.runtime.modes.choose_mode``).
    max_iter:
        Newton iterations before the solve stops iterating and finishes the remaining
        steps sequentially (the result is then exact, and ``stats`` says so). ``None``
        means ``min(L, 64)``.
    atol, rtol:
        Per-step convergence test of the forward solve, relative to the states' magnitudes, on
        the residual ``r_l = f(z_{l-1}) - z_l``: for every step l and sample b,
        ``||r_{l,b}|| <= atol + rtol * ||z_{l,b}||`` (``||.||``: max norm over the sample's
        state). Steps become final at 0.3x that tolerance (residuals left behind add up along
        the chain); ``full`` mode converges when every step meets it, the approximate modes
        (``diag``, ``identity``, ``zero``), whose last residuals share a sign, when every step
        meets 0.3x it (``deeppcr_fx.runtime.newton``). ``None`` takes the
        default for the compute dtype: rtol 1e-10 (float64), 1e-6 (float32 and half types,
        solved in float32); atol the dtype's smallest normal number (``torch.finfo(dtype).tiny``),
        so the test is relative at every scale. ``converged`` in the stats means the test held.
    adjoint_atol, adjoint_rtol:
        The same test for the backward pass (the linear adjoint), relative to the cotangents'
        magnitudes (``a`` in place of ``z`` above) on the residual of the adjoint equation
        ``a_l = dLoss/dz_l + J_{l+1}^T a_{l+1}``, so gradients
        of a loss at any scale (1e-8 or 1e8) are solved to the same relative accuracy.
        ``None`` takes the same dtype defaults as ``atol``/``rtol`` (not their values).
    batch:
        Whether dim 0 of every state tensor indexes independent samples (so Jacobians are
        per sample). ``None``: yes when every state tensor has >= 2 dims and the same
        size in dim 0. If samples are in fact coupled, the Jacobian is only approximate:
        convergence slows, the answer stays exact.
    vectorize:
        Evaluate all L steps in one ``torch.func.vmap`` call. ``"auto"`` tries vmap and
        falls back to a per-step loop (recorded in stats) when vmap cannot handle an op;
        ``True`` raises instead of falling back; ``False`` always loops.
    full_max_state:
        The ``jacobian="auto"`` threshold on the per-sample state size.
    record_stats:
        Record per-iteration residuals and window positions in each solve's ``SolveStats``, and
        keep every compiled chain's solves for ``CompiledModule.stats()``. ``False`` records
        only the counts (iterations, sequential finishes) of the latest solve.
    warm_start:
        Start a compiled chain's Newton iterations from its previous solution (same shapes,
        dtype and device) instead of from the input repeated. Valid for any input (Newton
        checks every step's residual, so a poor guess costs iterations, never accuracy);
        it pays where consecutive calls have similar trajectories (training steps,
        contractive chains that forget their input). The previous solution (L * B * n
        elements per chain) stays in memory between calls, up to 2^25 elements.
    progress:
        Show a progress bar (tqdm, ``pip install 'deeppcr_fx[progress]'``) for each compiled
        chain's solve: steps final out of L, Newton iterations, worst residual. Off by default.

    backend:
        What runs the forward Newton iterations: ``"eager"`` (PyTorch ops, the reference; always
        correct), ``"inductor"`` (each iteration one function traced and compiled by
        ``torch.compile`` per step and input signature; about 10 s the first time, reused by
        later solves of the same step and shapes and by inductor's on-disk cache across processes;
        a step it cannot trace runs eagerly and ``stats.backend_error`` says why) or ``"auto"``:
        eager until the eager time spent on one step and signature exceeds the predicted compile
        time, then compiled (so short or one-off solves never pay for a compile). See
        ``deeppcr_fx.runtime.backend``.
    check_every:
        The compiled backend reads its convergence flags from the device every this many
        iterations (one host sync each; the iterations after convergence are no-ops). ``None``:
        1 on CPU (a sync is free there, an iteration is not), 4 on CUDA.
    cuda_graphs:
        Capture the compiled iteration in a CUDA graph (``torch.compile(mode="reduce-overhead")``)
        when the state is on CUDA; does nothing on CPU. Needs a backend that compiles.
    flush_denormals:
        Run the solve (forward iterations, sequential finish, adjoint; compiled or eager) with CPU
        denormals flushed to zero (``torch.set_flush_denormal``), as XLA does by default. Products of
        many Jacobians can underflow to float32 denormals, which the CPU computes several times slower
        (4-5x once measured on a gain-1 tanh MLP; no difference on ``benchmarks/peers.py``'s problems).
        Results change only below the dtype's smallest normal number. The calling thread's setting
        before the solve is restored after it. Not applied by a distributed solve (``group=``).
        Default ``False``.

    Compiler
    --------
    policy:
        ``"always"`` rewrites every valid chain, ``"never"`` only traces and reports,
        ``"auto"`` rewrites where the calibrated cost model (``passes/cost_model.py``)
        predicts a speed-up of at least 1.3x.
    min_length:
        Chains shorter than this stay sequential.
    flat_params:
        Keep a chain's per-step Parameters in one stacked buffer (each Parameter's ``.data``
        becomes a view of its row; values and objects are unchanged), so no call restacks them.
        See ``deeppcr_fx.runtime.stacked``.
    direct_grads:
        In a plain ``loss.backward()``, write a chain's stacked parameter gradient straight into the
        Parameters' ``.grad`` (views of one buffer) where that is exactly what autograd would do;
        ``torch.autograd.grad``, ``backward(inputs=)``, hooks and process groups get their gradients
        through autograd. Needs ``flat_params``. See ``deeppcr_fx.runtime.direct_grads``.
    plain_backward_only:
        A promise that gradients of the chains' Parameters are only ever asked for by a plain
        ``loss.backward()``: the Parameters are then left out of the autograd graph, saving autograd's
        per-Parameter work (~8 us per Parameter per training step: 2.3x on a 4096-layer Linear(4, 4)
        training step, ``benchmarks/results/backward_vs_autograd_cpu.txt``). Broken promises are not
        errors: ``torch.autograd.grad(loss, params)`` calls them unused, ``backward(inputs=[p])`` gives
        them nothing, hooks registered after the forward pass do not fire. Default ``False``.
    front_end:
        How ``deeppcr.compile`` captures the model: ``"symbolic"`` (torch.fx tracing that inlines every
        module), ``"record"`` (one concrete run recorded op by op: unrolled loops, scheduler Python
        resolved), ``"dynamo"`` (a full-graph TorchDynamo capture) or ``"auto"`` (symbolic, then record).
    autotune:
        On the first call per input signature, time each chain's sequential and parallel
        variants on the real inputs and keep the faster. Each timing is of the whole model:
        forward + backward when gradients are enabled and something requires grad, else
        forward; a warm-up, then 3 alternating runs. The report shows both times
        (``ChainRecord.cost["measured"]``). Under ``policy="auto"`` it also times chains the
        cost model refused but predicted at >= 0.5x; under ``"always"`` it may revert chains to
        sequential; ``"never"`` tunes nothing. Results, RNG state, ``.grad`` and buffers are
        unchanged. Not available with ``front_end="dynamo"``. See ``deeppcr_fx.passes.autotune``.
    cache_limit:
        Specialisations (input signatures) one compiled module keeps, like TorchDynamo's cache
        size limit: each holds its graphs, stacked buffers and warm start. Calls with a new
        signature past the limit run the original model (exact; one warning, and a note in
        ``compiled.report``).
    """

    # solver
    jacobian: str = "auto"
    max_iter: Optional[int] = None
    atol: Optional[float] = None
    rtol: Optional[float] = None
    adjoint_atol: Optional[float] = None
    adjoint_rtol: Optional[float] = None
    batch: Optional[bool] = None
    vectorize: object = "auto"
    full_max_state: int = 64
    record_stats: bool = True
    warm_start: bool = True
    progress: bool = False
    backend: str = "auto"
    check_every: Optional[int] = None
    cuda_graphs: bool = False
    flush_denormals: bool = False
    # compiler
    policy: str = "auto"
    min_length: int = 8
    flat_params: bool = True
    direct_grads: bool = True
    plain_backward_only: bool = False
    autotune: bool = False
    front_end: str = "auto"
    cache_limit: int = 8

    def __post_init__(self) -> None:
        if self.jacobian not in JACOBIAN_MODES:
            raise InvalidInput(f"Config.jacobian={self.jacobian!r} is not one of {JACOBIAN_MODES}.")
        if self.policy not in POLICIES:
            raise InvalidInput(f"Config.policy={self.policy!r} is not one of {POLICIES}.")
        for name in ("atol", "rtol", "adjoint_atol", "adjoint_rtol"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise InvalidInput(f"Config.{name} must be >= 0 (or None), got {value!r}.")
        if self.backend not in BACKENDS:
            raise InvalidInput(f"Config.backend={self.backend!r} is not one of {BACKENDS}.")
        if self.check_every is not None and self.check_every < 1:
            raise InvalidInput(f"Config.check_every must be >= 1 (or None), got {self.check_every}.")
        if self.cuda_graphs and self.backend == "eager":
            raise InvalidInput("Config(cuda_graphs=True) captures the compiled iteration: use backend='auto' or "
                               "'inductor', not 'eager'.")
        if self.max_iter is not None and self.max_iter < 1:
            raise InvalidInput(f"Config.max_iter must be >= 1 (or None), got {self.max_iter}.")
        if self.vectorize not in ("auto", True, False):
            raise InvalidInput(f"Config.vectorize must be 'auto', True or False, got {self.vectorize!r}.")
        if self.front_end not in ("auto", "symbolic", "record", "dynamo"):
            raise InvalidInput(f"Config.front_end={self.front_end!r} is not one of "
                             "('auto', 'symbolic', 'record', 'dynamo').")
        if self.cache_limit < 1:
            raise InvalidInput(f"Config.cache_limit must be >= 1, got {self.cache_limit}.")
        if self.min_length < 1:
            raise InvalidInput(f"Config.min_length must be >= 1, got {self.min_length}.")

    def replace(self, **changes) -> "Config":
        """A copy with ``changes`` applied; unknown option names raise ``InvalidInput`` (a ``TypeError``)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise InvalidInput(f"unknown deeppcr option(s) {unknown}; known options: {sorted(names)}")
        return dataclasses.replace(self, **changes)

    def tolerances(self, compute_dtype: torch.dtype) -> tuple[float, float]:
        """``(atol, rtol)`` of the forward solve carried out in ``compute_dtype``."""
        atol, rtol = _DEFAULT_TOLERANCES.get(compute_dtype, _DEFAULT_TOLERANCES[torch.float32])
        return (atol if self.atol is None else self.atol, rtol if self.rtol is None else self.rtol)

    def adjoint_tolerances(self, compute_dtype: torch.dtype) -> tuple[float, float]:
        """``(adjoint_atol, adjoint_rtol)`` of the backward pass carried out in ``compute_dtype``."""
        atol, rtol = _DEFAULT_TOLERANCES.get(compute_dtype, _DEFAULT_TOLERANCES[torch.float32])
        return (atol if self.adjoint_atol is None else self.adjoint_atol,
                rtol if self.adjoint_rtol is None else self.adjoint_rtol)

    def checks_every(self, device: torch.device) -> int:
        """Iterations between the compiled backend's convergence checks (``check_every``)."""
        return self.check_every or (1 if device.type == "cpu" else 4)

    def iteration_cap(self, length: int) -> int:
        return min(length, 64) if self.max_iter is None else self.max_iter
