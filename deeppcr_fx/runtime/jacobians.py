"""Per-sample step Jacobians for all steps at once, with ``torch.func``.

For a batched step function ``g: Z (R, B, n) -> (R, B, n)`` (R steps, B samples) we need
``J[r, b] = d g(Z)[r, b] / d Z[r, b]``: one n x n matrix per step and sample. Steps are
independent by construction (vmap over steps) and samples are assumed independent (see
``Config.batch``), so one reverse-mode pass per output coordinate i, with the cotangent
``e_i`` broadcast over all steps and samples, yields row i of every Jacobian at once:

    vals, pullback = vjp(g, Z)                 # one forward pass gives the residual too
    rows = vmap(pullback)(E)  with  E[i, r, b] = e_i      -> rows[i, r, b, j] = J[r, b, i, j]

Reverse mode is the default because the Jacobians are square (n in, n out: forward and
reverse need the same n passes) and the reverse pass reuses the forward evaluation that
the Newton residual needs anyway. When reverse mode fails (an op without a batching rule
for its backward), ``Jacobians`` switches to forward mode (``jvp`` columns) for the rest
of the solve and records why.

If samples are in fact coupled, these are approximate Jacobians: Newton still converges
to the exact answer (the residual is exact), only more slowly.

Replicated batch (small states). The vmap over n cotangents above makes torch.func batch the
step's *backward* over a new dimension, and for per-step weights that means n copies of every
weight and batched matmuls of an awkward shape. When samples are independent and n * B is
small, one plain forward-and-backward on a batch of n * B samples does the same job: sample
i * B + b is a copy of sample b, and its cotangent is e_i, so its input gradient is row i of J[r, b]

    Zr[r, i*B + b] = Z[r, b]     rows = pullback_of_g_on_Zr(E)[r, i*B + b, j] = J[r, b, i, j]

(several times faster for small n * B: ``benchmarks/results/jacobian_methods_cpu.txt``, made by
``benchmarks/jacobian_methods.py``). ``replicates`` is the rule for when it is used, shared by the
runtime and the compiler's cost model. The step must accept a larger batch; if it does not (a
hard-coded batch size, an op that fails), the solve falls back to the vmap'd pullback and records
why in ``SolveStats.replicate_error``; a ``ReplicationMemo`` remembers the refusal for a chain's
later solves.

No stderr output. A ``torch.fx.GraphModule`` called through ``__call__`` prints the traceback of
any exception raised in its generated code to stderr (``torch/fx/graph_module.py``,
``_WrappedCall``) before re-raising it. A refused replication is expected and handled, so the
solver calls a GraphModule step's generated ``forward`` directly (``steps.direct_call``): the
exception keeps its own traceback and nothing is printed, with no process-wide redirection.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Union

import torch
from torch.func import jvp, vjp, vmap

from ..results import VectorizeError
from .modes import Mode, mode_of

# Replicate the batch (see above) when n * B is at most this: faster up to n * B = 64 and no faster
# at 256 in benchmarks/results/jacobian_methods_cpu.txt.
REPLICATE_MAX_SAMPLES = 128
# What a step raises when it cannot take a replicated batch: torch's shape and size checks (and
# out of memory) are RuntimeErrors; Python code that unpacks, indexes or asserts on a shape raises
# ValueError, IndexError, TypeError or AssertionError; an op without support, NotImplementedError.
STEP_REFUSALS = (RuntimeError, ValueError, IndexError, TypeError, AssertionError, NotImplementedError)


def replicates(batched: bool, batch: int, width: int, sample_dims: Iterable[Optional[int]] = ()) -> bool:
    """Whether a chain's Jacobians come from a replicated batch (see the module docstring): the one
    rule, used by the solver (``solve._Problem.replicated_steps``) and the compiler's cost model
    (``passes/step_profile.py``).

    Arguments:
        batched: whether the state has a batch dimension (``StateSpec.batch``, ``state.batched_layout``).
        batch: B, samples per state.
        width: n, elements per sample.
        sample_dims: each input's per-sample dimension as seen by one step (dim 0 of a shared
            tensor or of one step's slice of a per-step tensor; None where it has none).

    Returns:
        True when the state is batched, n * B <= ``REPLICATE_MAX_SAMPLES``, and no input has a
        dimension of size B > 1 where a sample's would be (per-sample noise or conditioning would
        not line up with n * B copies of the samples).
    """
    return batched and width * batch <= REPLICATE_MAX_SAMPLES and not any(d == batch > 1 for d in sample_dims)


class ReplicationMemo:
    """Whether one chain's step accepted a replicated batch, remembered for the chain's lifetime.

    ``PCRSolve`` holds one per chain and passes it to every ``solve`` (``replication=``), so a step
    that refused once is not asked again (each attempt costs a failed forward pass). A ``solve``
    called without one remembers only within that call (its forward and backward pass).
    ``accepts`` is None until the first attempt; ``reset()`` forgets the outcome.
    """

    def __init__(self) -> None:
        self.accepts: Optional[bool] = None

    def reset(self) -> None:
        self.accepts = None

    def __repr__(self) -> str:
        return f"ReplicationMemo(accepts={self.accepts})"


class Jacobians:
    """``evaluate`` with reverse mode first, and forward mode once reverse mode has failed.

    Calling it returns ``(vals, jac)``: the step values now, and ``jac()`` to form the
    Jacobians only if the caller needs them (a converged iteration does not).
    """

    def __init__(self, mode: Union[Mode, str]) -> None:
        self.mode = mode_of(mode)
        self.ad = "rev"
        self.rev_error: str | None = None
        self.replicate_error: str | None = None  # why the replicated batch was abandoned, if it was
        self.replicate_used = False  # a replicated-batch Jacobian was formed

    def __call__(self, g: Callable, Z: torch.Tensor, replicated: Optional[Callable] = None):
        """``replicated``, if given: ``g`` for a batch of n * B samples (see the module docstring)."""
        if self.ad == "fwd" or not self.mode.linearised:
            return evaluate(g, Z, self.mode, self.ad)
        if replicated is not None and self.replicate_error is None:
            vals = g(Z)

            def jac_replicated():
                J, self.replicate_error = try_replicated(replicated, Z, self.mode)
                self.replicate_used |= J is not None
                return self(g, Z)[1]() if J is None else J  # the vmap'd pullback when the step refused

            return vals, jac_replicated
        try:
            vals, jac = evaluate(g, Z, self.mode, "rev")
        except VectorizeError:
            raise
        except (RuntimeError, NotImplementedError) as exc:
            return self._forward_mode(exc)(g, Z)

        def jac_with_fallback():
            try:
                return jac()
            except (RuntimeError, NotImplementedError) as exc:
                return self._forward_mode(exc)(g, Z)[1]()

        return vals, jac_with_fallback

    def _forward_mode(self, exc: Exception) -> Callable:
        self.ad, self.rev_error = "fwd", f"{type(exc).__name__}: {exc}"

        def call(g, Z):
            try:
                return evaluate(g, Z, self.mode, "fwd")
            except (RuntimeError, NotImplementedError):
                raise exc from None  # forward mode fails too: the reverse-mode error is the clearer one

        return call


def evaluate(g: Callable, Z: torch.Tensor, mode: Union[Mode, str], ad: str = "rev") -> tuple[torch.Tensor, Callable]:
    """``(g(Z), jac)``; ``jac()`` is the Jacobian in ``mode``'s structure (None where the mode forms none)."""
    mode = mode_of(mode)
    if not mode.linearised:
        return g(Z), lambda: None
    if ad == "fwd":
        def columns():
            tangents = _basis(Z)
            cols = vmap(lambda t: jvp(g, (Z,), (t,))[1], chunk_size=_chunk_size(Z))(tangents)  # [j,r,b,i]=J[r,b,i,j]
            return mode.structure(cols.movedim(0, -1))

        return g(Z), columns
    vals, pullback = vjp(g, Z)
    return vals, lambda: jacobian_from_pullback(lambda c: pullback(c)[0], vals, mode)


# Basis vectors per vmap call: a batched pullback can materialise per-basis copies of per-step
# weights (L n^2 each), so wide states are processed in chunks of about this many state elements.
_ELEMENTS_PER_CHUNK = 1 << 25


def _chunk_size(vals: torch.Tensor) -> int:
    n = vals.shape[-1]
    return max(1, min(n, _ELEMENTS_PER_CHUNK // max(1, vals.numel() * n)))


def jacobian_from_pullback(pullback: Callable, vals: torch.Tensor, mode: Union[Mode, str]) -> torch.Tensor:
    """The Jacobian in ``mode``'s structure from a state pullback ``cotangent -> d<cotangent, g(Z)>/dZ``
    (square Jacobians)."""
    rows = vmap(pullback, chunk_size=_chunk_size(vals))(_basis(vals))  # rows[i, r, b, j] = J[r, b, i, j]
    return mode_of(mode).structure(rows.movedim(0, -2))


def jacobian_replicated(g_replicated: Callable, Z: torch.Tensor, mode: Union[Mode, str]) -> torch.Tensor:
    """The per-sample Jacobians of ``g`` at ``Z`` (R, B, n) from one pullback of ``g_replicated``, the
    same steps on a batch of n * B samples (see the module docstring)."""
    R, B, n = Z.shape
    Zr = Z.unsqueeze(1).expand(R, n, B, n).reshape(R, n * B, n).contiguous()
    _, pullback = vjp(g_replicated, Zr)
    E = torch.eye(n, dtype=Z.dtype, device=Z.device).view(1, n, 1, n).expand(R, n, B, n)
    rows = pullback(E.reshape(R, n * B, n).contiguous())[0].view(R, n, B, n)  # [r, i, b, j] = J[r, b, i, j]
    return mode_of(mode).structure(rows.transpose(1, 2))


def try_replicated(g_replicated: Callable, Z: torch.Tensor, mode: Union[Mode, str], quietly: object = None) -> tuple:
    """``(jacobian_replicated(...), None)``, or ``(None, why)`` when the step cannot take the larger
    batch (a hard-coded batch size, an input with the batch dimension): one of ``STEP_REFUSALS``.

    Nothing is printed either way (see "No stderr output" in the module docstring); ``quietly`` is
    accepted for callers written when a redirection of stderr hid torch.fx's print, and ignored."""
    try:
        return jacobian_replicated(g_replicated, Z, mode), None
    except STEP_REFUSALS as exc:
        return None, f"{type(exc).__name__}: {exc}"


def _basis(like: torch.Tensor) -> torch.Tensor:
    """E[i, ...] = e_i broadcast over all leading dims of ``like`` (a stride-0 view)."""
    n = like.shape[-1]
    eye = torch.eye(n, dtype=like.dtype, device=like.device)
    return eye.view(n, *([1] * (like.dim() - 1)), n).expand(n, *like.shape)
