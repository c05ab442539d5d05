"""The results vocabulary of deeppcr_fx: every error, refusal and finish cause, with the fix.

One module that the compiler (``passes/``), the runtime (``runtime/``) and the inspection
tools (``inspect/``) all import, and that imports none of them:

- ``DeepPCRError``: the base of every exception the library raises on purpose, so
  ``except deeppcr.DeepPCRError`` catches them all. Each subclass also derives from the
  built-in it has always been (``CompileError`` is a ``RuntimeError``, ``MissingDependency``
  an ``ImportError``).
- ``Reason``: why a chain (or a whole model) was left sequential; ``reason.remedy`` says what
  to change. ``Refusal(reason, detail)`` is the frozen record a pass returns.
- ``FinishCause``: why a solve (or its adjoint) finished its last steps sequentially.
- The words a ``ChainRecord`` is written in: its status (``REWRITTEN``, ``REFUSED``) and the
  kinds of value a step reads besides its state (``PER_STEP``, ``SHARED``, ``COEFFICIENT``).

In the manner of optimistix's ``RESULTS``: the enumeration carries its own messages, so a
report, an exception and a log line all say the same thing.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "DeepPCRError", "CompileError", "PassError", "TraceFailure", "RecordFailure", "VectorizeError",
    "MissingDependency", "InvalidInput", "Unsupported", "StaleParameters", "DistributedSolveError",
    "DistributedLayoutError", "PeerFailure", "Reason", "Refusal", "FinishCause",
    "REWRITTEN", "REFUSED", "PER_STEP", "SHARED", "COEFFICIENT",
]


# --- errors ------------------------------------------------------------------------------
class DeepPCRError(Exception):
    """The base of every error deeppcr_fx raises on purpose."""


class CompileError(DeepPCRError, RuntimeError):
    """``policy="always"`` and the model cannot be compiled (the report says why)."""


class PassError(DeepPCRError, RuntimeError):
    """A compiler pass failed; the message names the passes that already ran."""


class TraceFailure(DeepPCRError, RuntimeError):
    """The model's own ``forward`` cannot be traced symbolically."""


class RecordFailure(DeepPCRError, RuntimeError):
    """The recorded run reads input-dependent values into Python (data-dependent control flow)."""


class VectorizeError(DeepPCRError, RuntimeError):
    """``Config(vectorize=True)`` and ``torch.func.vmap`` cannot batch the step."""


class MissingDependency(DeepPCRError, ImportError):
    """An optional package is not installed; the message says what to install."""


class InvalidInput(DeepPCRError, ValueError, TypeError):
    """An argument of ``solve``, ``compile`` or ``Config`` is not what it must be; the message names it
    and the fix. (A ``ValueError`` and a ``TypeError``, as the built-in checks it replaces were.)"""


class Unsupported(DeepPCRError, NotImplementedError):
    """Something deeppcr_fx does not do (e.g. double backward through a solve); the message says what to do."""


class StaleParameters(DeepPCRError, RuntimeError):
    """A Parameter stacked into a chain was changed in place between the forward and the backward pass."""


class DistributedSolveError(DeepPCRError, RuntimeError):
    """A layer-parallel solve failed on some rank (raised on every rank of the group)."""


class DistributedLayoutError(DistributedSolveError, ValueError):
    """The ranks' slices do not describe one chain (state shapes, per-step shapes, options differ)."""


class PeerFailure(DistributedSolveError):
    """Another rank's step (or its derivative) raised during the solve; raised on the other ranks.

    The failing rank raises its own exception at the same point, so every rank leaves the solve
    together and the process group stays usable."""


# --- refusals ----------------------------------------------------------------------------
class Reason(str, enum.Enum):
    """Why a chain (or a whole model) was left sequential."""

    TOO_SHORT = "too_short"
    SHAPES_DIFFER = "shapes_differ"
    SHAPES_UNKNOWN = "shapes_unknown"
    UNSUPPORTED_STATE = "unsupported_state"
    ESCAPING_VALUE = "escaping_value"
    BUFFER_MUTATION = "buffer_mutation"
    RANDOMNESS = "randomness"
    DATA_DEPENDENT_CONTROL_FLOW = "data_dependent_control_flow"
    OPAQUE_MODULE = "opaque_module"
    UNSTACKABLE_INPUT = "unstackable_input"
    NOT_DIFFERENTIABLE = "not_differentiable"
    POLICY_NEVER = "policy_never"
    NOT_PROFITABLE = "not_profitable"
    TRACE_FAILED = "trace_failed"
    HOOKED_MODULE = "hooked_module"
    AUTOCAST = "autocast"

    @property
    def remedy(self) -> str:
        return _REMEDIES[self]


_REMEDIES = {
    Reason.TOO_SHORT: "shorter than Config.min_length: parallel depth does not pay for short chains; lower "
                      "min_length to force it.",
    Reason.SHAPES_DIFFER: "the repeated blocks map the state to different shapes (or use differently shaped "
                          "weights); only same-shaped segments form a chain. Make the widths equal or leave it.",
    Reason.SHAPES_UNKNOWN: "shape propagation could not compute these values on the meta device; pass "
                           "example_inputs that run the model, or make the blocks traceable.",
    Reason.UNSUPPORTED_STATE: "the value carried from step to step must be one floating-point tensor.",
    Reason.ESCAPING_VALUE: "a value computed inside a step (not the step's output) is used after the chain; "
                           "return only the per-step states.",
    Reason.BUFFER_MUTATION: "a step mutates a tensor in place (e.g. BatchNorm in train mode updates running "
                            "stats); call model.eval(), or use LayerNorm/GroupNorm, or an out-of-place op.",
    Reason.RANDOMNESS: "a step draws random numbers from its state-dependent part (e.g. dropout in train "
                       "mode); call model.eval() or draw the noise outside the step so it can be hoisted.",
    Reason.DATA_DEPENDENT_CONTROL_FLOW: "a step branches on tensor values (if x.sum() > 0, .item()); make the "
                                        "branch a tensor op (torch.where) so every step runs the same graph.",
    Reason.OPAQUE_MODULE: "a step calls a module whose forward could not be traced; make its forward "
                          "traceable by torch.fx or use the TorchDynamo backend.",
    Reason.UNSTACKABLE_INPUT: "a per-step input is not a tensor of one shape and dtype in every step (e.g. a "
                              "Python int that differs per step); make it a tensor or a constant.",
    Reason.NOT_DIFFERENTIABLE: "an op in the step has no derivative (e.g. a fused inference fast path such as "
                               "_transformer_encoder_layer_fwd); Newton needs the step's Jacobian. Call the model "
                               "with gradients enabled or disable the fast path.",
    Reason.POLICY_NEVER: "policy='never' only reports; use policy='always' or 'auto' to rewrite.",
    Reason.NOT_PROFITABLE: "policy='auto' predicts no speed-up of at least the margin here, or autotuning measured "
                           "the sequential chain faster (the cost line shows both; see passes/cost_model.py); use "
                           "policy='always' without autotune to rewrite anyway.",
    Reason.TRACE_FAILED: "the model's forward could not be traced by this front end; the original model runs. "
                         "Try torch.compile(model, backend='deeppcr') or make forward traceable.",
    Reason.HOOKED_MODULE: "a module inside the chain has forward or backward hooks, which a parallel solve cannot "
                          "call step by step; the chain runs sequentially so they fire. Remove the hooks (the "
                          "compiled module re-specialises) to solve it in parallel.",
    Reason.AUTOCAST: "torch.autocast is on: the steps would change the state's dtype mid-chain and the solver's own "
                     "products would be autocast too, so the chain runs as eager autocast runs it (exactly). Call the "
                     "model outside autocast (or cast it with .to(dtype)) to solve it in parallel.",
}


@dataclass(frozen=True)
class Refusal:
    """Why one chain stays sequential: a typed ``reason`` and a ``detail`` naming the node or value."""

    reason: Reason
    detail: str = ""

    @property
    def remedy(self) -> str:
        return self.reason.remedy

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.detail}" if self.detail else self.reason.value


# --- solver outcomes ---------------------------------------------------------------------
class FinishCause(str, enum.Enum):
    """Why a solve (or its adjoint) finished its last steps sequentially."""

    MAX_ITER = "max_iter"
    NON_FINITE = "non_finite"

    @property
    def remedy(self) -> str:
        return _FINISH_REMEDIES[self]


_FINISH_REMEDIES = {
    FinishCause.MAX_ITER: "Newton did not converge within max_iter: raise Config.max_iter, use "
                          "jacobian='full' for exact Newton steps, or keep this chain sequential.",
    FinishCause.NON_FINITE: "a Newton iterate or residual was NaN/Inf (chaotic or diverging dynamics, "
                            "or non-finite inputs); the sequential finish reproduces the plain loop.",
}


# --- the words of a ChainRecord ----------------------------------------------------------
REWRITTEN = "rewritten"
REFUSED = "refused"

PER_STEP = "per_step"  # a tensor per step, stacked along a new leading dimension L
SHARED = "shared"  # the same value for every step
COEFFICIENT = "coefficient"  # a Python float that differs per step, passed as a float64 tensor
