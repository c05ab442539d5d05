"""What one step of a chain costs to run: the inputs of the cost model, read from a candidate.

``profile(candidate, gm, config, device_type, backward)`` returns a frozen ``ChainShape``:

- ``length`` L, ``batch`` B and ``width`` n (per-sample state elements), split as the solver
  splits the state (``runtime/state.sample_layout`` with ``Config.batch``),
- ``ops``: the ops one step dispatches (``call_function``/``call_method``/``call_module`` nodes
  of one segment, without ``getitem``/``getattr``/``size``-like Python bookkeeping),
- ``module_calls``: ``nn.Module`` calls per step (module paths one segment's nodes come from
  that the next segment's do not: ``layers.3`` is called once per step, a parent ``encoder``
  wrapping the whole chain is not counted — nor is one module called at every step, such as a
  sampler's denoiser, which undercounts the sequential cost: the conservative side),
- ``flops``: floating-point operations of one step for the whole batch (2·out·in for linear,
  matmul and convolution, 4·q·k·d for attention, one per output element otherwise),
- ``per_step_tensors``: stacked per-step inputs; ``grad_tensors``: those that are Parameters
  requiring grad (one ``AccumulateGrad`` each per step in an eager backward),
- ``residual``: the state is read by two or more ops of the step (a skip path ``z + g(z)``, a
  sampler's ``a_t z + b_t eps(z)``); such chains are not contractive and need many Newton
  iterations,
- the Jacobian mode, the iteration cap, the dtype's size, the device type, whether a backward
  pass is expected, and whether parameter gradients bypass autograd's per-Parameter leaves
  (``Config.direct_grads``, read with a default so configs without the field work), and whether
  the Jacobians come from a replicated batch (``runtime/jacobians.replicates``).
"""
from __future__ import annotations

import math
import operator
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..config import Config
from ..runtime import jacobians, modes
from ..runtime.state import batched_layout
from .find_chains import Candidate
from .shape_prop import info_of
from .template import Slots
from .validate import state_layout

_BOOKKEEPING = {operator.getitem, getattr}
_BOOKKEEPING_METHODS = {"size", "dim", "numel", "__getitem__", "type_as", "to"}
_LINEAR = {F.linear, torch._C._nn.linear}
_MATMUL = {torch.matmul, operator.matmul, torch.mm, torch.bmm, torch.Tensor.matmul}
_CONV = {F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d}
_ATTENTION = {F.scaled_dot_product_attention}
OPAQUE_FLOPS_PER_ELEMENT = 10  # a module kept opaque: unknown work, assume a few ops per output element


@dataclass(frozen=True)
class ChainShape:
    length: int
    batch: int
    width: int
    ops: int
    module_calls: int
    flops: float
    per_step_tensors: int
    grad_tensors: int
    residual: bool
    mode: str
    iteration_cap: int
    itemsize: int
    device_type: str
    backward: bool
    direct_grads: bool = True  # the runtime writes the Parameters' .grad directly (runtime/direct_grads.py)
    replicated: bool = True  # Jacobians come from a replicated batch (runtime/jacobians.py)

    def to_dict(self) -> dict:
        return asdict(self)


def _numel(n) -> int:
    info = info_of(n) if isinstance(n, fx.Node) else None
    return math.prod(info.shape) if info is not None and info.is_tensor else 0


def _shape(n) -> Optional[tuple]:
    info = info_of(n) if isinstance(n, fx.Node) else None
    return info.shape if info is not None and info.is_tensor else None


def _arg(n: fx.Node, i: int, name: str):
    return n.args[i] if len(n.args) > i else n.kwargs.get(name)


def node_flops(n: fx.Node) -> float:
    """Floating-point operations of one node (see the module docstring)."""
    out = _numel(n)
    target = n.target
    if n.op == "call_function" and target in _LINEAR:
        w = _shape(_arg(n, 1, "weight"))
        return 2.0 * out * (w[-1] if w else 1)
    if (n.op == "call_function" and target in _MATMUL) or (n.op == "call_method" and target in ("matmul", "mm", "bmm")):
        a = _shape(n.args[0]) if n.args else None
        return 2.0 * out * (a[-1] if a else 1)
    if n.op == "call_function" and target in _CONV:
        w = _shape(_arg(n, 1, "weight"))
        return 2.0 * out * (math.prod(w[1:]) if w else 1)
    if n.op == "call_function" and target in _ATTENTION:
        q, k = _shape(_arg(n, 0, "query")), _shape(_arg(n, 1, "key"))
        if q and k:
            return 4.0 * math.prod(q[:-1]) * k[-2] * q[-1]
    if n.op == "call_module":
        return float(OPAQUE_FLOPS_PER_ELEMENT * out)
    return float(out)


def _dispatches(n: fx.Node) -> bool:
    if n.op == "call_function":
        return n.target not in _BOOKKEEPING
    if n.op == "call_method":
        return n.target not in _BOOKKEEPING_METHODS
    return n.op == "call_module"


def _module_paths(nodes: list) -> set:
    return {path for n in nodes for path, _ in (n.meta.get("nn_module_stack") or {}).values() if path}


def _is_parameter(n: fx.Node, gm: fx.GraphModule) -> bool:
    if n.op != "get_attr":
        return False
    try:
        gm.get_parameter(n.target)
        return True
    except AttributeError:
        return False


def _leading(n: fx.Node) -> Optional[int]:
    info = info_of(n) if isinstance(n, fx.Node) else None
    return info.shape[0] if info is not None and info.is_tensor and len(info.shape) >= 1 else None


def _is_grad_parameter(n: fx.Node, gm: fx.GraphModule) -> bool:
    if n.op != "get_attr":
        return False
    try:
        return gm.get_parameter(n.target).requires_grad
    except AttributeError:
        return False


def profile(c: Candidate, gm: fx.GraphModule, config: Config, device_type: str, backward: bool) -> Optional[ChainShape]:
    """The cost model's view of candidate ``c``; None when the state's shape is unknown."""

    seg = c.segments[0]
    infos = [info_of(n) for n in seg.ins]
    if any(i is None or not i.is_tensor for i in infos) or c.shapes_differ:
        return None
    info = infos[0]
    shape = info.shape
    batch, width = state_layout([i.shape for i in infos], config.batch)
    members = set(seg.nodes)
    later = _module_paths(c.segments[1].nodes) if len(c.segments) > 1 else set()
    slots = Slots.of(c)
    per_step = len(slots.per_step_ext) + len(slots.per_step_float)
    grads = sum(_is_grad_parameter(seg.externals[i], gm) for i in slots.per_step_ext)
    params = sum(_is_parameter(seg.externals[i], gm) for i in slots.per_step_ext)
    # the runtime's own rules: jacobians.replicates (each input's per-sample dimension as one step sees
    # it), and StackedAttributes' direct gradients need every stacked Parameter trained (else autograd
    # stacks them, one leaf each)
    externals = [seg.externals[i] for i in (*slots.per_step_ext, *slots.shared_ext)]
    replicated = jacobians.replicates(batched_layout(shape, config.batch), batch, width, map(_leading, externals))
    direct = bool(getattr(config, "direct_grads", False) and getattr(config, "flat_params", False)) and grads == params
    return ChainShape(
        length=c.length, batch=int(batch), width=int(max(width, 1)),
        ops=max(1, sum(_dispatches(n) for n in seg.nodes)),
        module_calls=len(_module_paths(seg.nodes) - later),
        flops=float(sum(node_flops(n) for n in seg.nodes)),
        per_step_tensors=per_step, grad_tensors=int(grads),
        residual=c.components > 1 or sum(u in members for u in seg.state_in.users) >= 2,
        mode=modes.choose_mode(config.jacobian, int(width), config.full_max_state, c.length * int(batch)),
        iteration_cap=config.iteration_cap(c.length),
        itemsize=torch.empty((), dtype=info.dtype, device="meta").element_size(),
        device_type=device_type, backward=backward, direct_grads=direct, replicated=replicated)
