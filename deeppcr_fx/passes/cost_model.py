"""The per-chain cost model behind ``policy="auto"``: sequential vs parallel time, as sympy expressions.

A chain is described by a ``ChainShape`` (``passes/step_profile.py``): length L, batch B, state
width n, ops q, module calls m and FLOPs F (whole batch) of one step, per-step tensors P (G
of them Parameters that get gradients), Jacobian mode, iteration cap. Each way of running it
is a ``Work``: sympy expressions in the symbols of ``SYMBOLS`` counting what it does. Its
time is the dot product with the device's unit costs (``UNITS``), calibrated by a
micro-benchmark (``passes/calibrate.py``: cached per process and device)::

    T = launches·t_op + module_calls·t_module + autograd_nodes·t_autograd + stacked·t_stack
        + eager_flops·c_forward + bytes / bandwidth + matmuls·t_mm(n) + matvecs·t_mv(n)
        + forward_ops·t_forward + forward_flops·c_forward(n)        (vmap of the step over L steps)
        + vjp_ops·t_vjp + vjp_flops·c_vjp(n)                        (its vjp and one pullback)
        + jacobian_ops·t_jacobian + jacobian_flops·c_jacobian(n)    (the pullback vmap'd over n cotangents)

(t_*: seconds per op or item; c_*: seconds per step FLOP, which folds in torch.func's copies.)

Sequential (eager), per chain::

    forward    launches L·q, module_calls L·m, eager_flops L·F
    backward   autograd_nodes L·(q + G), eager_flops 2·L·F        (when a backward pass is expected)

Parallel (``PCRSolve``), with N = L·B rows·samples, state bytes SB = N·n·e, Jacobian bytes
JB = N·n²·e (e bytes per element), k Newton iterations, S steps finished sequentially::

    setup       launches SOLVE_OPS + q, stacked L·P
    Jacobian    replicated (n·B <= 128, a batched state and no input with the batch dimension, as the
                runtime requires; one forward and backward on a batch of n·B copies of each sample):
                  forward_ops q, forward_flops L·F, vjp_ops q, vjp_flops n·L·F, bytes 4·JB
                else (n vjps): jacobian_ops q, jacobian_flops L·F, bytes 3·JB
    iteration   full/diag: the Jacobian; identity/zero: forward_ops q, forward_flops L·F;
                + Newton bookkeeping: launches NEWTON_OPS, bytes 8·SB
                + scan (the mode's ``scan_terms``, ``runtime/modes.py``), full: chunked on CPUs for
                  L >= 128 (K = min(32, max(8, round(sqrt(L/2)))); both
                  rules are ``runtime/scan.py``'s ``chunked`` and ``chunk_formula``; R = ceil(log2(L/K))):
                  launches 8K + 10R + 20 (per chunk row two batched products
                  and six row views; per PCR round about ten ops), matmuls N + N·R/K,
                  matvecs 2N + N·R/K, bytes 4·JB + 4·SB; plain PCR (GPUs, short chains,
                  R = ceil(log2 L)): launches 10R + 5, matmuls N·R, matvecs N·R, bytes R·(4·JB + 3·SB);
                  diag: the same launches and elementwise bytes; identity: a cumsum; zero: a copy
    finish      launches S·(q + P + 2), eager_flops S·F
    forward     setup + k·iteration + finish
    backward    full: the Jacobian + the transposed scan (+ 4 launches, 2·JB + 2·SB bytes);
                diag/identity/zero: k·(a pullback: vjp_ops q, vjp_flops L·F + bookkeeping + the
                transposed scan), plus the diagonal (jacobian_ops q, jacobian_flops L·F) for diag;
                then the parameter pullback (vjp_ops q, vjp_flops L·F) + BACKWARD_OPS launches
                + gradients to the Parameters: stacked L·P with Config.direct_grads, else
                autograd_nodes L·G (one AccumulateGrad per Parameter)

Expected Newton iterations k (``expected_iterations``): ``full`` Jacobians converge in 3-10
iterations on contractive chains (5 on the benchmarks' tanh MLPs with ``nn.Linear``'s
initialisation, 7-10 with weights of gain 1), so k = 8;
chains with a skip path (``ChainShape.residual``: residual blocks, samplers) are not
contractive and took up to 37 (residual MLP, L = 1024), so k = 40; ``diag``, ``identity`` and
``zero`` converge linearly at best, so k = the iteration cap, and the remaining L - cap steps
are counted as a sequential finish. Everything is capped at ``Config.iteration_cap(L)``.

``policy="auto"`` rewrites a chain when the predicted speed-up T_seq / T_par is at least
``MARGIN`` (1.3): the model ignores caches, threads and Python overheads it does not count,
and a wrong rewrite costs more than a missed one. It undercounts the sequential side where
it is unsure (module calls shared by every step are not counted; an eager op costs the mean
of a small add, tanh and linear, while ``F.linear`` with autograd records several nodes) and
predicts cold solves (``Config.warm_start`` usually needs fewer iterations on later calls).
``Config.min_length`` (default 8) is a hard floor for every policy.

How well the predictions matched measurements (predicted vs measured speed-ups over the
paper and resnet grids, and how much the calibration varies between processes on a loaded
machine, which the margin absorbs) is recorded in ``benchmarks/results/cost_model_checks_cpu.txt``.
The calibration follows the machine's state when the model is compiled: on a busy machine the
batched primitives measure slower (so do the solves) and "auto" keeps more chains sequential.

``Config.autotune`` replaces the prediction by a measurement on the real inputs
(``passes/autotune.py``); the report shows both.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import Callable, Optional

import sympy

from ..runtime import scan
from ..runtime.modes import Mode, mode_of
from .calibrate import DeviceConstants
from .step_profile import ChainShape

MARGIN = 1.3  # "auto" rewrites at a predicted speed-up of at least this
ITERATIONS_CONTRACTIVE = 8  # expected Newton iterations, full Jacobian, no skip path
ITERATIONS_RESIDUAL = 40  # full Jacobian, a skip path (residual blocks, samplers)
SOLVE_OPS = 100  # small ops and Python steps of one solve besides its iterations
NEWTON_OPS = 60  # small ops and Python steps of one Newton iteration besides the step and the scan
BACKWARD_OPS = 60  # small ops and Python steps of one backward pass besides its products

L, B, n, k, q, m, P, G, F, S, e = sympy.symbols("L B n k q m P G F S e", positive=True)
SYMBOLS = {s.name: s for s in (L, B, n, k, q, m, P, G, F, S, e)}
UNITS = {name: sympy.Symbol(name, positive=True) for name in (
    "t_op", "t_module", "t_autograd", "t_stack", "bandwidth", "t_mm", "t_mv",
    "t_forward", "c_forward", "t_vjp", "c_vjp", "t_jacobian", "c_jacobian")}
_PRICES = (("launches", "t_op"), ("module_calls", "t_module"), ("autograd_nodes", "t_autograd"),
           ("stacked", "t_stack"), ("eager_flops", "c_forward"), ("matmuls", "t_mm"), ("matvecs", "t_mv"),
           ("forward_ops", "t_forward"), ("forward_flops", "c_forward"), ("vjp_ops", "t_vjp"),
           ("vjp_flops", "c_vjp"), ("jacobian_ops", "t_jacobian"), ("jacobian_flops", "c_jacobian"))
_ZERO = sympy.S.Zero


@dataclass(frozen=True)
class Work:
    """Counts of what a computation does (sympy expressions); ``seconds()`` prices them."""

    launches: sympy.Expr = _ZERO
    module_calls: sympy.Expr = _ZERO
    autograd_nodes: sympy.Expr = _ZERO
    stacked: sympy.Expr = _ZERO
    eager_flops: sympy.Expr = _ZERO
    matmuls: sympy.Expr = _ZERO
    matvecs: sympy.Expr = _ZERO
    bytes: sympy.Expr = _ZERO
    forward_ops: sympy.Expr = _ZERO
    forward_flops: sympy.Expr = _ZERO
    vjp_ops: sympy.Expr = _ZERO
    vjp_flops: sympy.Expr = _ZERO
    jacobian_ops: sympy.Expr = _ZERO
    jacobian_flops: sympy.Expr = _ZERO

    def __add__(self, other: "Work") -> "Work":
        return Work(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __rmul__(self, factor) -> "Work":
        return Work(*(factor * getattr(self, f.name) for f in fields(self)))

    def seconds(self) -> sympy.Expr:
        total = self.bytes / UNITS["bandwidth"]
        for count, unit in _PRICES:
            total += getattr(self, count) * UNITS[unit]
        return total


# ------------------------------------------------------------------------------------------- the model
def sequential_work(backward: bool) -> Work:
    forward = Work(launches=L * q, module_calls=L * m, eager_flops=L * F)
    return forward + Work(autograd_nodes=L * (q + G), eager_flops=2 * L * F) if backward else forward


def chunk_expression() -> sympy.Expr:
    """The scan's chunk size K as an expression of L: ``runtime/scan.chunk_formula``, built with sympy."""
    return scan.chunk_formula(L, sqrt=sympy.sqrt, floor=sympy.floor, minimum=sympy.Min, maximum=sympy.Max)


def _scan(mode: Mode, chunked: bool) -> Work:
    """One scan: the mode's terms (``Mode.scan_terms``) with R PCR rounds, across the K-row chunks when chunked."""
    N, SB, JB = L * B, L * B * n * e, L * B * n ** 2 * e
    if chunked:
        K = chunk_expression()
        return Work(**mode.scan_terms(N, SB, JB, sympy.ceiling(sympy.log(sympy.ceiling(L / K), 2)), K))
    return Work(**mode.scan_terms(N, SB, JB, sympy.ceiling(sympy.log(L, 2))))


def _jacobian(replicated: bool) -> Work:
    if replicated:  # the values, then one forward + backward on n·B copies of each sample
        return Work(forward_ops=q, forward_flops=L * F, vjp_ops=q, vjp_flops=n * L * F, bytes=4 * L * B * n ** 2 * e)
    return Work(jacobian_ops=q, jacobian_flops=L * F, bytes=3 * L * B * n ** 2 * e)


def parallel_work(mode: str, chunked: bool, backward: bool, direct_grads: bool = True,
                  replicated: bool = True) -> Work:
    mode = mode_of(mode)
    bookkeeping = Work(launches=NEWTON_OPS, bytes=8 * L * B * n * e)
    scan = _scan(mode, chunked)
    evaluation = _jacobian(replicated) if mode.linearised else Work(forward_ops=q, forward_flops=L * F)
    setup = Work(launches=SOLVE_OPS + q, stacked=L * P)
    finish = Work(launches=S * (q + P + 2), eager_flops=S * F)
    forward = setup + k * (evaluation + bookkeeping + scan) + finish
    if not backward:
        return forward
    transposed = scan + Work(launches=4, bytes=2 * L * B * n ** 2 * e + 2 * L * B * n * e)
    if mode.exact:
        adjoint = _jacobian(replicated) + transposed
    else:
        pullback = Work(vjp_ops=q, vjp_flops=L * F)
        diagonal = Work(jacobian_ops=q, jacobian_flops=L * F) if mode.linearised else Work()
        adjoint = diagonal + k * (pullback + bookkeeping + transposed)
    params = Work(vjp_ops=q, vjp_flops=L * F, launches=BACKWARD_OPS)
    grads = Work(stacked=L * P) if direct_grads else Work(autograd_nodes=L * G)
    return forward + adjoint + params + grads


@functools.lru_cache(maxsize=None)
def expressions(mode: str, chunked: bool, backward: bool, direct_grads: bool = True,
                replicated: bool = True) -> "tuple[sympy.Expr, sympy.Expr]":
    """``(T_sequential, T_parallel)`` in seconds, as sympy expressions of ``SYMBOLS`` and ``UNITS``."""
    return (sequential_work(backward).seconds(),
            parallel_work(mode, chunked, backward, direct_grads, replicated).seconds())


@functools.lru_cache(maxsize=None)
def _compiled(mode: str, chunked: bool, backward: bool, direct_grads: bool, replicated: bool) -> Callable:
    names = list(SYMBOLS) + list(UNITS)
    args = [SYMBOLS[s] if s in SYMBOLS else UNITS[s] for s in names]
    fn = sympy.lambdify(args, list(expressions(mode, chunked, backward, direct_grads, replicated)), modules="math")
    return lambda values: fn(*(values[s] for s in names))


# ------------------------------------------------------------------------------------------ predictions
def expected_iterations(shape: ChainShape) -> "tuple[Optional[int], str]":
    """Newton iterations the forward solve is expected to take before any cap, and why (see the module
    docstring); None where it is not expected to converge before the cap (linear convergence)."""
    if not mode_of(shape.mode).exact:
        return None, f"'{shape.mode}' converges linearly at best: the cap"
    if shape.residual:
        return ITERATIONS_RESIDUAL, "a skip path: not contractive"
    return ITERATIONS_CONTRACTIVE, "full Jacobian, no skip path"


@dataclass(frozen=True)
class Prediction:
    """The cost model's estimate for one chain on one device."""

    sequential_s: float
    parallel_s: float
    iterations: int
    why_iterations: str
    sequential_finish: int  # steps the solve is expected to finish sequentially after the cap
    backward: bool
    mode: str
    device: str

    @property
    def speedup(self) -> float:
        return self.sequential_s / self.parallel_s if self.parallel_s > 0 else 0.0

    def profitable(self, margin: float = MARGIN) -> bool:
        return self.speedup >= margin

    def describe(self, margin: float = MARGIN) -> str:
        what = "forward + backward" if self.backward else "forward"
        verdict = ">=" if self.profitable(margin) else "<"
        return f"predicted {what} speed-up {self.speedup:.2f}x {verdict} {margin}x on {self.device}"

    def to_dict(self) -> dict:
        return {"sequential_ms": round(1e3 * self.sequential_s, 4), "parallel_ms": round(1e3 * self.parallel_s, 4),
                "predicted_speedup": round(self.speedup, 3), "iterations": self.iterations,
                "why_iterations": self.why_iterations, "sequential_finish": self.sequential_finish,
                "backward": self.backward, "jacobian": self.mode, "margin": MARGIN}


def chunked_scan(shape: ChainShape) -> bool:
    """Whether the runtime's scan is chunked for this chain (``runtime/scan.chunked``)."""
    return scan.chunked(shape.length, shape.device_type)


def predict(shape: ChainShape, constants: DeviceConstants, iterations: Optional[int] = None) -> Prediction:
    """Evaluate the model for ``shape`` with the device's ``constants`` (``iterations`` overrides k)."""
    expected, why = expected_iterations(shape) if iterations is None else (iterations, "given")
    cap = shape.iteration_cap
    capped = expected is None or expected > cap
    k_expected = cap if capped else expected
    finish = shape.length - cap if capped and cap < shape.length else 0
    if capped and expected is not None:
        why += f"; capped at max_iter {cap}"
    c, width = constants, shape.width
    values = dict(L=shape.length, B=shape.batch, n=width, k=k_expected, q=shape.ops, m=shape.module_calls,
                  P=shape.per_step_tensors, G=shape.grad_tensors, F=max(shape.flops, 1.0), S=finish,
                  e=max(shape.itemsize, 4), t_op=c.t_op, t_module=c.t_module, t_autograd=c.t_autograd,
                  t_stack=c.t_stack, bandwidth=c.bandwidth, t_mm=c.product_time(width, "matmul"),
                  t_mv=c.product_time(width, "matvec"))
    for kind in ("forward", "vjp", "jacobian"):
        values[f"t_{kind}"], values[f"c_{kind}"] = c.op_time(kind), c.flop_time(kind, width)
    seq, par = _compiled(shape.mode, chunked_scan(shape), shape.backward, shape.direct_grads, shape.replicated)(values)
    return Prediction(sequential_s=float(seq), parallel_s=float(par), iterations=k_expected, why_iterations=why,
                      sequential_finish=finish, backward=shape.backward, mode=shape.mode,
                      device=constants.device)
