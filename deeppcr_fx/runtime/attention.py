"""Scaled dot-product attention that ``torch.func.vmap`` evaluates in one call, with eager's numbers.

On CPU, ``torch.nn.functional.scaled_dot_product_attention`` has no vmap batching rule: vmap runs it
once per sample (per step of a chain), and its backward the same way. ``scaled_dot_product_attention``
here is a drop-in replacement (``passes/decompose.py`` puts it in every chain's step template) that
gives the answers eager gives and is batched under every ``torch.func`` transform the solver uses
(vmap, vjp, vmap of vjp, make_fx with functionalize):

- When eager would run CPU flash attention (what it picks for 4-D inputs: ``torch._fused_sdp_choice``,
  asked once per input signature; that kernel is the one without a batching rule), ``_Flash`` calls
  it itself (``aten._scaled_dot_product_flash_attention_for_cpu``) and, for gradients, its backward
  kernel (``_FlashBackward``). Both are ``torch.autograd.Function``s with a ``vmap`` rule that folds
  vmap's dimension into the kernel's batch dimension: one kernel call for all steps, the kernel's own
  numerics (equal to eager's bit for bit), fully masked rows 0 as eager gives them.
- Under ``torch.func.functionalize`` (the compiled iteration's tracer, ``runtime/backend.trace``) an
  autograd.Function cannot run (torch has no functionalize rule for it: "NYI"); there the math
  kernel's composite ops stand in (``_math``, ``aten/src/ATen/native/transformers/attention.cpp``),
  equal to rounding, a row whose every score is ``-inf`` 0 with a zero gradient, as flash gives it.
- Otherwise the call is eager's own: the math kernel (3-D inputs, a 3-D mask, flash disabled by
  ``torch.nn.attention.sdpa_kernel``) is composite, so vmap batches it already; dropout, CUDA (which has
  batching rules), nested tensors and anything the choice rejects also stay eager's, and a per-sample
  fallback, if any, shows in ``SolveStats``.

Outside torch.func transforms (a sequential step, a plain call) it is eager's call. Double backward
through the flash path is refused, as eager's CPU flash backward refuses it.

custom_op with ``register_autograd`` would be the documented route, but its generated autograd.Function
has no ``setup_context``, so torch.func's ``vjp`` refuses it (pytorch/pytorch#168393, #179652).
"""
from __future__ import annotations

import functools
import inspect
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch.utils._python_dispatch import _disable_current_modes

aten = torch.ops.aten
FLASH, MATH = 1, 0  # torch.nn.attention.SDPBackend values _fused_sdp_choice returns


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention``, batched under vmap (see the module docstring)."""
    eager = functools.partial(F.scaled_dot_product_attention, query, key, value, attn_mask=attn_mask,
                              dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    if not _batching_or_differentiating() or dropout_p != 0.0:
        return eager()
    tensors = (query, key, value) + (() if attn_mask is None else (attn_mask,))
    if any(t.device.type != "cpu" or t.is_nested for t in tensors):
        return eager()
    kernel = _eager_kernel(_signature(query), _signature(key), _signature(value),
                           None if attn_mask is None else _signature(attn_mask), is_causal, scale, enable_gqa,
                           _backend_flags())
    if kernel != FLASH:  # the math kernel is composite: vmap batches eager's own call
        return eager()
    if attn_mask is not None and attn_mask.dtype != query.dtype:
        attn_mask = _additive(attn_mask, query.dtype)  # what eager hands its kernels
    if _functionalizing():
        return _math(query, key, value, attn_mask, is_causal, scale, enable_gqa)
    return _flash(query, key, value, attn_mask, is_causal, scale)[0]


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True: attend) as eager's additive mask (0 / -inf), or a float mask in ``dtype``."""
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill(mask.logical_not(), float("-inf"))
    return mask.to(dtype)


# which kernel eager picks -------------------------------------------------------------------------
def _signature(t: torch.Tensor) -> tuple:
    """What the kernel choice reads of one input, as one step sees it (under vmap: the per-sample view)."""
    return tuple(t.shape), tuple(t.stride()), t.dtype


def _backend_flags() -> tuple:
    """The global backend switches (``torch.nn.attention.sdpa_kernel`` sets them) and their order."""
    return (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled(),
            tuple(torch._C._get_sdp_priority_order()) if hasattr(torch._C, "_get_sdp_priority_order") else ())


@functools.lru_cache(maxsize=256)
def _eager_kernel(q: tuple, k: tuple, v: tuple, mask: Optional[tuple], is_causal: bool, scale: Optional[float],
                  enable_gqa: bool, flags: tuple) -> Optional[int]:
    """The backend eager's CPU dispatcher picks for inputs of these shapes, strides and dtypes (asked of
    ``torch._fused_sdp_choice`` on stand-ins, outside any transform or tracing mode); None if it refuses."""
    del flags  # part of the cache key only
    with _disable_current_modes(), torch._C._DisableFuncTorch():
        stand_in = lambda s: torch.empty_strided(s[0], s[1], dtype=s[2])  # noqa: E731
        try:
            choice = torch._fused_sdp_choice(stand_in(q), stand_in(k), stand_in(v),
                                             None if mask is None else stand_in(mask), 0.0, is_causal,
                                             scale=scale, enable_gqa=enable_gqa)
        except RuntimeError:
            return None
    return choice if choice in (FLASH, MATH) else None


# the math kernel's composite ops, for the tracer --------------------------------------------------
def _math(q, k, v, mask, is_causal, scale, enable_gqa):
    """``_scaled_dot_product_attention_math`` as eager calls it (mask made additive first), in plain ops."""
    factor = math.sqrt(abs(scale) if scale is not None else 1.0 / math.sqrt(q.size(-1)))
    q = q * (-factor if scale is not None and scale < 0 else factor)
    if enable_gqa:
        k = k.repeat_interleave(q.size(-3) // k.size(-3), -3)
        v = v.repeat_interleave(q.size(-3) // v.size(-3), -3)
    scores = torch.matmul(q, k.transpose(-2, -1) * factor)
    if is_causal:
        causal = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(causal.logical_not(), float("-inf"))
    if mask is not None:
        scores = scores + mask
    # _safe_softmax: a row of only -inf is 0, with a zero gradient (softmax of a zeroed row, then masked)
    dead = (scores == float("-inf")).all(-1, keepdim=True)
    weights = torch.softmax(scores.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0)
    return torch.matmul(weights, v)


# CPU flash attention, folded over vmap ------------------------------------------------------------
def _folded(info, in_dims: tuple, tensors: tuple, rank: int) -> list:
    """Each tensor with vmap's dimension first (expanded where it has none), padded to ``1 + rank`` dims."""
    out = []
    for t, d in zip(tensors, in_dims):
        if t is not None:
            t = t.expand(info.batch_size, *t.shape) if d is None else t.movedim(d, 0)
            t = t.reshape(t.shape[:1] + (1,) * (1 + rank - t.dim()) + t.shape[1:])
        out.append(t)
    return out


def _fold_mask(info, in_dim, mask, batch: int):
    """The mask for the folded (vmap x batch) call: kept as it is when it broadcasts over both."""
    if mask is None:
        return None
    if in_dim is None:
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        if mask.shape[0] == 1:
            return mask
    (mask,) = _folded(info, (in_dim,), (mask,), 4)
    mask = mask.expand(mask.shape[0], batch, *mask.shape[2:])
    return mask.reshape(-1, *mask.shape[2:])


def _merge(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *t.shape[2:])


def _batching_or_differentiating() -> bool:
    """A torch.func transform other than functionalize is active (vmap, grad/vjp, jvp)."""
    return torch._C._are_functorch_transforms_active() and any(
        i.key() != TransformType.Functionalize for i in retrieve_all_functorch_interpreters())


def _functionalizing() -> bool:
    """Under ``torch.func.functionalize`` (the compiled iteration's tracer, ``runtime/backend.trace``)."""
    return any(i.key() == TransformType.Functionalize for i in retrieve_all_functorch_interpreters())


def _plain(*tensors) -> bool:
    """No transform and no autograd to record: the kernel can be called directly."""
    return not torch._C._are_functorch_transforms_active() and not (
        torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


def _flash(q, k, v, mask, is_causal, scale):
    if _plain(q, k, v, mask):
        return _Flash.forward(q, k, v, mask, is_causal, scale)
    return _Flash.apply(q, k, v, mask, is_causal, scale)


def _flash_backward(grad, q, k, v, out, lse, mask, is_causal, scale):
    if _plain(grad, q, k, v, out, lse, mask):
        return _FlashBackward.forward(grad, q, k, v, out, lse, mask, is_causal, scale)
    return _FlashBackward.apply(grad, q, k, v, out, lse, mask, is_causal, scale)


class _Flash(torch.autograd.Function):
    """``(out, logsumexp)`` of CPU flash attention; gradients by its backward kernel (``_FlashBackward``)."""

    @staticmethod
    def forward(q, k, v, mask, is_causal, scale):
        return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, attn_mask=mask, scale=scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, mask, is_causal, scale = inputs
        ctx.save_for_backward(q, k, v, mask, *output)
        ctx.options = (is_causal, scale)
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, mask, out, lse = ctx.saved_tensors
        return (*_flash_backward(grad_out, q, k, v, out, lse, mask, *ctx.options), None, None, None)

    @staticmethod
    def vmap(info, in_dims, q, k, v, mask, is_causal, scale):
        Q, K, V = _folded(info, in_dims[:3], (q, k, v), 4)
        out, lse = _flash(_merge(Q), _merge(K), _merge(V), _fold_mask(info, in_dims[3], mask, Q.shape[1]),
                          is_causal, scale)
        n = info.batch_size
        return (out.view(n, *Q.shape[1:-1], V.shape[-1]), lse.view(n, -1, *lse.shape[1:])), (0, 0)


class _FlashBackward(torch.autograd.Function):
    """The gradients of ``_Flash``'s output with respect to ``(q, k, v)``, from the flash backward kernel."""

    @staticmethod
    def forward(grad, q, k, v, out, lse, mask, is_causal, scale):
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(grad, q, k, v, out, lse, 0.0, is_causal,
                                                                           attn_mask=mask, scale=scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("double backward through CPU flash attention is not supported (nor is it in eager)")

    @staticmethod
    def vmap(info, in_dims, grad, q, k, v, out, lse, mask, is_causal, scale):
        G, Q, K, V, O = _folded(info, in_dims[:5], (grad, q, k, v, out), 4)
        (LSE,) = _folded(info, in_dims[5:6], (lse,), 3)
        grads = _flash_backward(_merge(G), _merge(Q), _merge(K), _merge(V), _merge(O), _merge(LSE),
                                _fold_mask(info, in_dims[6], mask, Q.shape[1]), is_causal, scale)
        return tuple(g.view(t.shape) for g, t in zip(grads, (Q, K, V))), (0, 0, 0)


# autograd.Function.apply binds arguments with inspect.signature on every call; a stored signature
# makes that a lookup (PEP 362's __signature__), a third of the cost of a small batched call
for _fn in (_Flash.forward, _FlashBackward.forward):
    _fn.__signature__ = inspect.signature(_fn)
