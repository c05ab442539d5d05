"""Direct gradients: a stacked per-step gradient written into L Parameters' ``.grad`` at once.

A stacked per-step input (``StackedAttributes``) enters the graph through one custom node whose
inputs are a private *anchor* leaf and the L Parameters themselves, so every way of asking
autograd for gradients reaches them. Its backward receives the stacked gradient G (L, ...) and
asks the engine whether it will run the anchor's ``AccumulateGrad`` node
(``torch._C._will_engine_execute_node``): only a plain ``loss.backward()`` does (no ``inputs=``,
not ``torch.autograd.grad``: those run only what leads to the tensors asked for, never the
private anchor). Then, where it is *provably* what autograd would do, it

- sets ``p.grad = G[l]`` (views of one buffer) where ``.grad`` is None, or adds ``G[l]`` to the
  existing ``.grad`` (one ``torch._foreach_add_``), exactly as ``AccumulateGrad`` would, and
  returns no gradient for the Parameters (the engine still visits their ``AccumulateGrad``
  nodes, which do nothing without one);

and otherwise returns ``G[l]`` for each Parameter, and autograd's own ``AccumulateGrad`` nodes
(or ``torch.autograd.grad``'s capture) take them: ``torch.autograd.grad(loss, params)``, any
subset, ``allow_unused``; ``loss.backward(inputs=[p])``; hooks. In every case it checks that no
Parameter was modified in place between the forward and the backward pass (autograd's own
"modified by an inplace operation" check, which the solve's saved stack would not see).

Provably safe, checked in the backward pass (hooks registered after the forward count): a plain
``loss.backward()`` without ``create_graph``; every tensor a leaf that requires grad, each in one
row (a tensor tied into several steps needs its gradients summed: the flat group guarantees
distinct rows); no tensor hooks (``register_hook``, ``register_post_accumulate_grad_hook``); no
``torch.distributed`` process group up (DistributedDataParallel and FSDP hook ``AccumulateGrad``
nodes from C++, invisibly from here). Hooks put directly on an ``AccumulateGrad`` node
(``get_gradient_edge(p).node.register_hook``) outside a process group are not seen: they run with
no gradient in a plain backward.

Cost (``benchmarks/results/backward_vs_autograd_cpu.txt``, L = 4096 layers, 8192 Parameters): being
graph inputs costs autograd's own per-Parameter work, about 1 us forward (the Function's inputs)
and a few us backward (the engine visits every ``AccumulateGrad`` node, even one given no
gradient): the training step is 2.3x slower than with the Parameters left out of the graph
(``direct_grads_apply(connect=False)``, correct only for a plain ``loss.backward()``), and 5%
faster than autograd's own stacking. Per Parameter, not per element: negligible for chains of
few large Parameters.
"""
from __future__ import annotations

import itertools
import operator
import sys
from typing import Optional

import torch

from ..results import StaleParameters

_IS_LEAF = operator.attrgetter("is_leaf")
_REQUIRES_GRAD = operator.attrgetter("requires_grad")
_HOOKS = operator.attrgetter("_backward_hooks")
_POST_HOOKS = operator.attrgetter("_post_accumulate_grad_hooks")
_VERSION = operator.attrgetter("_version")
_GRAD = operator.attrgetter("grad")


def supports_direct_grads(tensors: list, requires_grad: Optional[list] = None) -> bool:
    """Whether writing ``.grad`` directly is exactly what autograd would do for these tensors
    (``requires_grad``: their flags, if the caller has them).

    ``tensors`` must be distinct (a tensor tied into several steps needs its gradients summed):
    the caller's flat group guarantees it, each tensor viewing its own row, so this per-call
    check does not pay for a set of L ids again."""
    flags = list(map(_REQUIRES_GRAD, tensors)) if requires_grad is None else requires_grad
    return (all(flags) and all(map(_IS_LEAF, tensors)) and not _distributed()
            and not any(map(_HOOKS, tensors)) and not any(map(_POST_HOOKS, tensors)))


def _distributed() -> bool:
    """Whether a torch.distributed process group is up: DistributedDataParallel and FSDP hook the
    Parameters' ``AccumulateGrad`` nodes from C++, invisibly from here, so their gradients must go
    through autograd's leaves (checked per call: O(1))."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class GradBuffer:
    """The stacked gradient buffer a group of Parameters' ``.grad`` views last pointed into.

    Making L view objects costs O(L) Python work per backward, so the views are kept and reused:
    a later backward copies its gradient into the same buffer, but only when nothing outside
    holds it any more: no view object is referenced from anywhere else (every ``.grad`` was set
    to None, no ``g = p.grad`` kept) and no other tensor shares its storage (no slice of a
    gradient kept), so no gradient a user kept from an earlier step can change under them.

    Both checks read reference counts: ``sys.getrefcount`` of each view (a ``.grad`` that still
    holds it, or any Python name, adds one) and ``torch._C._storage_Use_Count`` of the buffer's
    storage (every tensor sharing it adds one; the temporary ``untyped_storage()`` object is one
    more). ``tests/test_runtime_state.py`` pins exactly these counts, so a torch release that
    changes them fails there instead of reusing a buffer a user still holds."""

    def __init__(self) -> None:
        self.buffer: Optional[torch.Tensor] = None
        self.views: tuple = ()
        self._free_refs = 0  # sys.getrefcount of a view that only ``views`` holds

    def rows(self, grad: torch.Tensor) -> tuple:
        """Views of a buffer holding ``grad``, one per row."""
        buf = self.buffer
        if buf is not None and buf.shape == grad.shape and buf.dtype == grad.dtype and buf.device == grad.device \
                and self._unreferenced():
            buf.copy_(grad)
            return self.views
        self.buffer = grad.clone(memory_format=torch.contiguous_format)
        self.views = self.buffer.unbind(0)
        self._free_refs = next(map(sys.getrefcount, self.views))
        return self.views

    def _unreferenced(self) -> bool:
        storage_users = torch._C._storage_Use_Count(self.buffer.untyped_storage()._cdata)
        # 2 = the buffer itself and the temporary storage object above; then one per view
        return storage_users == 2 + len(self.views) and all(c == self._free_refs for c in map(sys.getrefcount, self.views))


def direct_grads_apply(stacked: torch.Tensor, tensors: list, grad_buffer: Optional[GradBuffer] = None,
                       connect: bool = True) -> torch.Tensor:
    """``stacked`` (whose rows hold ``tensors``' values) as a differentiable tensor whose gradient
    reaches ``tensors`` (all leaves requiring grad): written into ``.grad`` directly in a plain
    ``loss.backward()`` where that is safe, else handed to autograd (see the module docstring);
    ``grad_buffer`` lets later calls reuse the ``.grad`` views.

    ``connect=False`` leaves the tensors out of the graph (the anchor alone): no per-tensor cost, but
    only a plain ``loss.backward()`` reaches them (``torch.autograd.grad`` calls them unused,
    ``backward(inputs=...)`` gives them nothing) and hooks registered after this call are bypassed;
    for callers that know that is all they do, and only where ``supports_direct_grads`` holds now."""
    anchor = torch.zeros((), dtype=stacked.dtype, device=stacked.device, requires_grad=True)
    node = torch.autograd.graph.get_gradient_edge(anchor).node  # (ctx.next_functions would wrap all L+4)
    # Function.apply's Python wrapper loops over the L tensors (functorch's dead-wrapper check, needed
    # only under a torch.func transform): half the cost of the call at L = 4096, so it is skipped outside one.
    apply = _DirectGrads.apply if torch._C._are_functorch_transforms_active() else _BASE_APPLY
    return apply(anchor, stacked, (node, grad_buffer or GradBuffer()), tensors, *(tensors if connect else ()))


def plain_backward(anchor_node) -> bool:
    """Whether the running backward pass is a plain ``loss.backward()`` (no ``inputs=``, not
    ``torch.autograd.grad``): the engine then runs every node of the graph, the private
    ``anchor_node`` included; otherwise it runs only what leads to the requested inputs, which
    the anchor never is. Any doubt (another engine, e.g. compiled autograd) answers False."""
    try:
        return bool(torch._C._will_engine_execute_node(anchor_node))
    except (RuntimeError, TypeError):
        return False


class _DirectGrads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor, stacked, held, tensors, *inputs):
        ctx.anchor_node, ctx.grad_buffer = held
        ctx.tensors, ctx.versions, ctx.connected = tensors, list(map(_VERSION, tensors)), bool(inputs)
        return stacked.detach()

    @staticmethod
    def backward(ctx, grad):
        tensors = ctx.tensors
        nothing = (None, None, None, None)
        per_tensor = (None,) * len(tensors) if ctx.connected else ()
        if list(map(_VERSION, tensors)) != ctx.versions:
            raise StaleParameters(
                "one of the Parameters stacked into a deeppcr chain was modified by an inplace operation "
                "between the forward and the backward pass (e.g. optimizer.step() before loss.backward()); "
                "run the forward pass again after changing the Parameters."
            )
        if grad is None:
            return nothing + per_tensor
        grad = grad.to(tensors[0].dtype)
        # Checked now, not in the forward pass: hooks registered or a process group set up since count.
        if ctx.connected and (torch.is_grad_enabled() or not plain_backward(ctx.anchor_node)
                              or not supports_direct_grads(tensors)):
            return nothing + grad.unbind(0)  # autograd's AccumulateGrad nodes take them from here
        with torch.no_grad():
            current = list(map(_GRAD, tensors))
            if all(g is None for g in current):  # the usual case after optimizer.zero_grad()
                list(map(setattr, tensors, itertools.repeat("grad"), ctx.grad_buffer.rows(grad)))
            else:
                existing, incoming = [], []
                for t, old, g in zip(tensors, current, grad.unbind(0)):
                    if old is None:
                        t.grad = g.clone()
                    else:
                        existing.append(old)
                        incoming.append(g)
                if existing:
                    torch._foreach_add_(existing, incoming)
        # None for each tensor: its AccumulateGrad node, which the engine still visits, does nothing.
        return nothing + per_tensor


_BASE_APPLY = super(torch.autograd.Function, _DirectGrads).apply  # torch._C._FunctionBase.apply, bound to it
