"""Direct gradients: a stacked per-step gradient written into L Parameters' ``.grad`` at once.

Autograd gives every leaf tensor its own ``AccumulateGrad`` node, and the engine runs each
of them separately: about 6 us per leaf on a CPU, 50 ms for the 8192 Parameters of a
4096-layer MLP, which is more than the parallel solve's whole forward and backward. So a
stacked per-step input (``StackedAttributes``) can instead enter the graph through one
private *anchor* leaf: its backward receives the stacked gradient G (L, ...) and

- sets ``p.grad = G[l]`` (views of G) where ``.grad`` is None, or adds ``G[l]`` to the
  existing ``.grad`` (one ``torch._foreach_add_``), exactly as ``AccumulateGrad`` would;
- checks that no Parameter was modified in place between the forward and the backward
  pass (autograd's own "modified by an inplace operation" check, which a leaf-free graph
  would otherwise lose).

This is only used when it is indistinguishable from autograd's own accumulation: every
tensor is a leaf that requires grad and has no tensor hooks (``register_hook``,
``register_post_accumulate_grad_hook``). The one thing it changes: the Parameters are not
nodes of the graph, so ``torch.autograd.grad(loss, params)`` and ``loss.backward(inputs=params)``
report them as unused (an error; ``None`` with ``allow_unused=True``). Use
``Config(direct_grads=False)`` for those (or for hooks registered on ``AccumulateGrad``
nodes, e.g. by DistributedDataParallel); ``loss.backward()`` is unaffected.
"""
from __future__ import annotations

import operator

import torch

_IS_LEAF = operator.attrgetter("is_leaf")
_REQUIRES_GRAD = operator.attrgetter("requires_grad")
_HOOKS = operator.attrgetter("_backward_hooks")
_POST_HOOKS = operator.attrgetter("_post_accumulate_grad_hooks")
_VERSION = operator.attrgetter("_version")


def supports_direct_grads(tensors: list) -> bool:
    """Whether writing ``.grad`` directly is exactly what autograd would do for these tensors."""
    return (all(map(_IS_LEAF, tensors)) and all(map(_REQUIRES_GRAD, tensors))
            and not any(map(_HOOKS, tensors)) and not any(map(_POST_HOOKS, tensors)))


def direct_grads_apply(stacked: torch.Tensor, tensors: list) -> torch.Tensor:
    """``stacked`` (whose rows hold ``tensors``' values) as a differentiable tensor whose gradient
    lands in ``tensors[l].grad``."""
    anchor = torch.zeros((), dtype=stacked.dtype, device=stacked.device, requires_grad=True)
    return _DirectGrads.apply(anchor, stacked, tensors, list(map(_VERSION, tensors)))


class _DirectGrads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor, stacked, tensors, versions):
        ctx.tensors, ctx.versions = tensors, versions
        return stacked.detach()

    # The anchor is private, so the engine runs this node only in a plain ``loss.backward()`` (an
    # ``autograd.grad`` or ``backward(inputs=...)`` call never asks for the anchor's gradient).
    @staticmethod
    def backward(ctx, grad):
        tensors = ctx.tensors
        if list(map(_VERSION, tensors)) != ctx.versions:
            raise RuntimeError(
                "one of the Parameters stacked into a deeppcr chain was modified by an inplace operation "
                "between the forward and the backward pass (e.g. optimizer.step() before loss.backward()); "
                "run the forward pass again after changing the Parameters."
            )
        if grad is None:
            return None, None, None, None
        # Our own buffer, laid out like the Parameters (AccumulateGrad clones an expanded or strided one).
        grad = grad.to(tensors[0].dtype).contiguous()
        with torch.no_grad():
            existing, incoming = [], []
            for t, g in zip(tensors, grad.unbind(0)):
                if t.grad is None:
                    t.grad = g
                else:
                    existing.append(t.grad)
                    incoming.append(g)
            if existing:
                torch._foreach_add_(existing, incoming)
        return None, None, None, None
