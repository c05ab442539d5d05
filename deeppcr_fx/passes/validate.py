"""Judge chain candidates before anything is mutated: typed refusals with remedies.

``validate(plan, shapes, config)`` sets ``plan.refusal``: ``None`` for a chain that can be
rewritten, or a frozen ``Refusal(reason, detail)``; ``reason.remedy`` tells the user what to
change. It also builds the chain's step template, once (``plan.template``, used by ``rewrite``),
and resolves the Jacobian mode the solver will use (``plan.mode``).
Checks, in order: segment shapes, data-dependent opaque modules, known shapes, state
type, values escaping the chain, opaque modules, in-place mutation, randomness and
data-dependent reads inside the state-dependent core, stackable per-step inputs, the
one-step template run on meta values (and differentiated: Newton needs its Jacobian),
then length (``min_length``). The policy (``"never"``, the cost model for ``"auto"``,
autotuning) is applied afterwards by the pipeline's ``decide`` pass.
"""
from __future__ import annotations

import math
import operator
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..config import Config
from ..results import Reason, Refusal
from ..runtime.modes import choose_mode
from ..runtime.state import sample_layout
from .collector_writes import is_write, late_writes_problem
from .find_chains import Candidate
from .hooks import describe_hooks, has_hooks
from .plan import ChainPlan
from .shape_prop import META_FAILURES, ShapeInfo, info_of
from .template import StepTemplate


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
    if n.op == "call_method" and n.target == "__setitem__":  # symbolic tracing's x[i] = v
        return "__setitem__ is in place"
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


def _template_check(c: Candidate) -> "tuple[Optional[Refusal], Optional[StepTemplate]]":
    """Build the step template (once: ``rewrite`` uses it) and run it on meta values: slots must be
    accepted as tensors, the state's shape and dtype kept, and the step differentiable."""
    seg = c.segments[0]
    template = StepTemplate.build(c)
    slots = template.slots
    try:
        states = [info_of(n) for n in seg.ins]
        args = [_meta(states[0]) if c.components == 1 else tuple(_meta(s) for s in states)]
        args += [_meta(info_of(seg.externals[i])) for i in slots.per_step_ext]
        args += [torch.empty((), dtype=torch.float64, device="meta") for _ in slots.per_step_float]
        args += [_meta(info_of(seg.externals[i])) for i in slots.shared_ext]
        with torch.no_grad():
            out = template.graph_module.forward(*args)  # .forward: no torch.fx traceback print on failure
    except META_FAILURES as exc:
        return Refusal(Reason.UNSTACKABLE_INPUT, f"the one-step template does not run with stacked inputs: "
                                                 f"{_scalar_users(template)}{_first_line(exc)}"), None
    outs = (out,) if c.components == 1 else out
    if not isinstance(outs, tuple) or len(outs) != len(states) or any(
            not isinstance(o, torch.Tensor) or tuple(o.shape) != s.shape or o.dtype != s.dtype
            for o, s in zip(outs, states)):
        described = ", ".join(s.describe() for s in states)
        return Refusal(Reason.SHAPES_DIFFER, f"one step maps {described} to {out!r:.80}"), None
    try:  # Newton and the adjoint differentiate the step with respect to the state
        value, pullback = torch.func.vjp(lambda z: template.graph_module.forward(z, *args[1:]), args[0])
        pullback(torch.utils._pytree.tree_map(torch.ones_like, value))
    except META_FAILURES as exc:
        return Refusal(Reason.NOT_DIFFERENTIABLE, _first_line(exc)), None
    return None, template


def _scalar_users(template: StepTemplate) -> str:
    """Which ops read a per-step float (a 0-d tensor in the template) directly: those wanting a Python number fail."""
    coefficients = [n for n in template.graph_module.graph.nodes if n.op == "placeholder" and n.name.startswith("coef_")]
    ops = sorted({getattr(u.target, "__name__", str(u.target)) for c in coefficients for u in c.users})
    return f"a per-step Python float reaches {', '.join(ops)}, which may need a Python number there; " if ops else ""


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def validate(plan: ChainPlan, gm: fx.GraphModule, shapes: ShapeInfo, config: Config) -> None:
    """Judge ``plan.candidate``: set ``plan.refusal`` (None: it can be rewritten), ``plan.template``
    and ``plan.mode``. Mutates nothing but the plan."""
    c = plan.candidate
    plan.refusal = _structure(c, shapes) or _hooks(c, gm)
    if plan.refusal is None:
        plan.refusal, plan.template = _template_check(c)
    if plan.refusal is None and c.length < config.min_length:
        plan.refusal = Refusal(Reason.TOO_SHORT, f"L={c.length} < min_length={config.min_length}")
    plan.mode = planned_mode(c, config)
    plan.validated = True


def planned_mode(c: Candidate, config: Config) -> str:
    """The Jacobian mode ``deeppcr.solve`` will use for this chain's state (``""`` if its shape is unknown):
    the runtime's own rules, ``sample_layout`` (honours ``Config.batch``) and ``choose_mode``."""
    infos = [info_of(n) for n in c.segments[0].ins]
    if any(info is None or not info.is_tensor for info in infos):
        return ""
    batch, width = state_layout([info.shape for info in infos], config.batch)
    return choose_mode(config.jacobian, width, config.full_max_state, c.length * batch)


def state_layout(shapes: list, batch) -> tuple:
    """``(B, n)`` of a state of one or several tensors, as ``runtime/state.StateSpec.of`` splits it."""
    if len(shapes) == 1:
        return sample_layout(shapes[0], batch)
    batched = batch if batch is not None else all(len(s) >= 2 for s in shapes) and len({s[0] for s in shapes}) == 1
    if batched:
        return shapes[0][0], sum(math.prod(s[1:]) for s in shapes)
    return 1, sum(math.prod(s) for s in shapes)


def _hooks(c: Candidate, gm: fx.GraphModule) -> Optional[Refusal]:
    """A module the chain's steps come from (or call) has hooks: they must fire, so no parallel solve."""
    seen: set = set()
    for n in c.nodes:
        paths = [path for path, _ in (n.meta.get("nn_module_stack") or {}).values()]
        paths += [n.target] if n.op == "call_module" else []
        for path in paths:
            if path in seen:
                continue
            seen.add(path)
            try:
                module = gm.get_submodule(path)
            except AttributeError:  # a path of another front end's naming (TorchDynamo's L['self'])
                continue
            if has_hooks(module):
                return Refusal(Reason.HOOKED_MODULE, f"{path} has {describe_hooks(module)}")
    return None


def _structure(c: Candidate, shapes: ShapeInfo) -> Optional[Refusal]:
    """The checks on the chain's nodes, before any template is built."""
    first = c.segments[0]
    if c.shapes_differ:
        shapes_seen = sorted({str(info_of(s.state_out).describe()) if info_of(s.state_out) else "?"
                              for s in c.segments})
        return Refusal(Reason.SHAPES_DIFFER, f"segment outputs {', '.join(shapes_seen)}")
    for n in c.nodes:
        if n.op == "call_module" and n.name in shapes.data_dependent:
            return Refusal(Reason.DATA_DEPENDENT_CONTROL_FLOW, f"{n.target}: {shapes.failed.get(n.name, '')}")
    infos = [info_of(n) for n in first.ins]
    if any(info is None for info in infos) or any(info_of(n) is None for n in c.nodes):
        return Refusal(Reason.SHAPES_UNKNOWN, f"no meta value for nodes after {first.state_in.name}")
    for n, info in zip(first.ins, infos):
        if not info.is_tensor or not info.dtype.is_floating_point:
            return Refusal(Reason.UNSUPPORTED_STATE, f"state {n.name} is {info.describe()}")
    members = set(c.nodes)
    outs = {o for s in c.segments for o in s.outs}
    for n in c.nodes:
        if n not in outs and any(u not in members for u in n.users):
            users = [u for u in n.users if u not in members]
            written = " (written into a collector buffer: a row that is not a step's state, e.g. torchdiffeq's " \
                      "interpolation between grid points)" if all(is_write(u) for u in users) else ""
            return Refusal(Reason.ESCAPING_VALUE, f"{n.name} is used by {[u.name for u in users]}{written}")
    last = max(c.nodes, key={n: i for i, n in enumerate(c.nodes[0].graph.nodes)}.get)
    late = late_writes_problem(members, [o for o in outs if o in members], last)  # solution[j] = y inside the loop: moved after it
    if late:
        return Refusal(Reason.BUFFER_MUTATION, late)
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
    return None
