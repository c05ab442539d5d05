"""Judge chain candidates before anything is mutated: typed refusals with remedies.

``validate(candidate, ...)`` returns ``None`` for a chain that can be rewritten, or a
frozen ``Refusal(reason, detail)``; ``reason.remedy`` tells the user what to change.
Checks, in order: segment shapes, data-dependent opaque modules, known shapes, state
type, values escaping the chain, opaque modules, in-place mutation, randomness and
data-dependent reads inside the state-dependent core, stackable per-step inputs, the
one-step template run on meta values (and differentiated: Newton needs its Jacobian),
then length (``min_length``). The policy (``"never"``, the cost model for ``"auto"``,
autotuning) is applied afterwards by the pipeline's ``decide`` pass.
"""
from __future__ import annotations

import enum
import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..config import Config
from .find_chains import Candidate
from .shape_prop import ShapeInfo, info_of


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
    GRAPH_BREAK = "graph_break"

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
    Reason.GRAPH_BREAK: "TorchDynamo split the model into several graphs; chains that cross a graph break "
                        "cannot be found. Remove the Python that breaks the graph (see torch._dynamo.explain).",
}


@dataclass(frozen=True)
class Refusal:
    reason: Reason
    detail: str = ""

    @property
    def remedy(self) -> str:
        return self.reason.remedy

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.detail}" if self.detail else self.reason.value


_RANDOM_FUNCTIONS = {torch.rand, torch.randn, torch.randint, torch.rand_like, torch.randn_like,
                     torch.randint_like, torch.bernoulli, torch.normal, torch.multinomial, torch.poisson,
                     torch.randperm}
_DROPOUTS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
             torch.dropout, torch.alpha_dropout, torch.feature_dropout}
_RANDOM_METHODS = {"bernoulli_", "normal_", "uniform_", "random_", "exponential_", "bernoulli", "multinomial"}
_VALUE_METHODS = {"item", "tolist", "nonzero", "__bool__", "numpy"}
_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem}


def _is_random(n: fx.Node) -> bool:
    if n.op == "call_function":
        if n.target in _RANDOM_FUNCTIONS:
            return True
        if n.target in _DROPOUTS:
            training = n.kwargs.get("training", n.args[2] if len(n.args) > 2 else True)
            return bool(training) and n.kwargs.get("p", n.args[1] if len(n.args) > 1 else 0.5) != 0
        name = getattr(n.target, "__name__", "")
        return "dropout" in name or "rand" in name or "bernoulli" in name
    return n.op == "call_method" and n.target in _RANDOM_METHODS


def _mutates(n: fx.Node) -> Optional[str]:
    if n.op == "call_function" and n.target in (F.batch_norm, torch.batch_norm):
        training = n.kwargs.get("training", n.args[5] if len(n.args) > 5 else False)
        if training and any(isinstance(a, fx.Node) for a in (n.args[1:3] if len(n.args) > 2 else ())):
            return "batch_norm in train mode updates its running statistics"
    if n.op == "call_function" and n.target in _INPLACE_FUNCTIONS:
        return f"{getattr(n.target, '__name__', n.target)} is in place"
    if n.op == "call_method" and n.target.endswith("_") and not n.target.startswith("__"):
        return f"Tensor.{n.target} is in place"
    if n.op == "call_function" and getattr(n.target, "__name__", "").endswith("_"):
        return f"{n.target.__name__} is in place"
    if n.kwargs.get("inplace") is True or n.kwargs.get("out") is not None:
        return f"{n.name} writes in place"
    return None


def _meta(info) -> object:
    if info is None:
        raise ValueError("no shape")
    return torch.empty(info.shape, dtype=info.dtype, device="meta") if info.is_tensor else info.constant


def _template_check(c: Candidate) -> Optional[Refusal]:
    """Run the step template once on meta values: slots must be accepted as tensors, the state kept."""
    from .rewrite import slots_of, step_template  # rewrite builds on find_chains, like this module

    slots = slots_of(c)
    seg = c.segments[0]
    try:
        state = info_of(seg.state_in)
        args = [_meta(state)]
        args += [_meta(info_of(seg.externals[i])) for i in slots.per_step_ext]
        args += [torch.empty((), dtype=torch.float64, device="meta") for _ in slots.per_step_float]
        args += [_meta(info_of(seg.externals[i])) for i in slots.shared_ext]
        template = step_template(c, slots)
        with torch.no_grad():
            out = template(*args)
    except Exception as exc:
        return Refusal(Reason.UNSTACKABLE_INPUT, f"the one-step template does not run with stacked inputs: "
                                                 f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != state.shape or out.dtype != state.dtype:
        return Refusal(Reason.SHAPES_DIFFER, f"one step maps {state.describe()} to {out!r:.80}")
    try:  # Newton and the adjoint differentiate the step with respect to the state
        value, pullback = torch.func.vjp(lambda z: template(z, *args[1:]), args[0])
        pullback(torch.ones_like(value))
    except Exception as exc:
        return Refusal(Reason.NOT_DIFFERENTIABLE, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    return None


def validate(c: Candidate, gm: fx.GraphModule, shapes: ShapeInfo, config: Config) -> Optional[Refusal]:
    first = c.segments[0]
    if c.shapes_differ:
        shapes_seen = sorted({str(info_of(s.state_out).describe()) if info_of(s.state_out) else "?"
                              for s in c.segments})
        return Refusal(Reason.SHAPES_DIFFER, f"segment outputs {', '.join(shapes_seen)}")
    for n in c.nodes:
        if n.op == "call_module" and n.name in shapes.data_dependent:
            return Refusal(Reason.DATA_DEPENDENT_CONTROL_FLOW, f"{n.target}: {shapes.failed.get(n.name, '')}")
    info = info_of(first.state_in)
    if info is None or any(info_of(n) is None for n in c.nodes):
        return Refusal(Reason.SHAPES_UNKNOWN, f"no meta value for nodes after {first.state_in.name}")
    if not info.is_tensor or not info.dtype.is_floating_point:
        return Refusal(Reason.UNSUPPORTED_STATE, f"state {first.state_in.name} is {info.describe()}")
    members = set(c.nodes)
    outs = {s.state_out for s in c.segments}
    for n in c.nodes:
        if n not in outs and any(u not in members for u in n.users):
            return Refusal(Reason.ESCAPING_VALUE, f"{n.name} is used by {[u.name for u in n.users if u not in members]}")
    for n in c.nodes:
        if n.op == "call_module":
            if n.name in shapes.data_dependent:
                return Refusal(Reason.DATA_DEPENDENT_CONTROL_FLOW, f"{n.target}: {shapes.failed.get(n.name, '')}")
            return Refusal(Reason.OPAQUE_MODULE, f"{n.target} could not be traced")
        if n.op == "call_method" and n.target in _VALUE_METHODS or getattr(n.target, "__name__", "") in _VALUE_METHODS:
            return Refusal(Reason.DATA_DEPENDENT_CONTROL_FLOW, f"{n.name} reads a tensor value ({n.target})")
        why = _mutates(n)
        if why:
            return Refusal(Reason.BUFFER_MUTATION, f"{n.name}: {why}")
        if _is_random(n):
            return Refusal(Reason.RANDOMNESS, f"{n.name} ({getattr(n.target, '__name__', n.target)}) draws random "
                                              "numbers inside the state-dependent core")
    for i, slot in enumerate(zip(*(s.externals for s in c.segments))):
        if all(x is slot[0] for x in slot):
            continue
        infos = [info_of(x) for x in slot]
        if any(v is None or not v.is_tensor for v in infos) or len({(v.shape, v.dtype) for v in infos}) != 1:
            return Refusal(Reason.UNSTACKABLE_INPUT, f"slot {i}: {[x.name for x in slot][:4]}...")
    broken = _template_check(c)
    if broken:
        return broken
    if c.length < config.min_length:
        return Refusal(Reason.TOO_SHORT, f"L={c.length} < min_length={config.min_length}")
    return None
