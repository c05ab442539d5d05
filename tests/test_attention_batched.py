"""``runtime/attention.py``: scaled dot-product attention batched under torch.func, with eager's answers.

For each mask kind (none, causal, boolean and additive masks with fully masked rows, a finite large
negative mask, shared or per-step masks, scale, GQA) and for both CPU kernels eager picks (flash for
4-D inputs, math for 3-D ones), the batched version over L steps equals eager's per-step loop: the
forward, the vjp of the batched call (parameter gradients), the vmap of that vjp (the solver's
Jacobian rows), a vjp inside vmap, and the same under make_fx with functionalize (the compiled
iteration's tracer); no per-sample fallback warning; and a float64 gradcheck.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.func import vjp, vmap

from deeppcr_fx.runtime import attention
from deeppcr_fx.runtime.attention import scaled_dot_product_attention as batched_sdpa

L, B, H, S, D = 3, 2, 2, 5, 4
NEG = float("-inf")


def _masks(dtype):
    torch.manual_seed(1)
    allowed = torch.rand(B, 1, S, S) > 0.3
    allowed[0, :, 1] = False  # a fully masked row
    allowed[1, :, :, 0] = True
    additive = torch.zeros(B, 1, S, S, dtype=dtype).masked_fill(~allowed, NEG)
    return {
        "none": dict(),
        "causal": dict(is_causal=True),
        "bool": dict(attn_mask=allowed),
        "bool_2d": dict(attn_mask=allowed[1, 0]),
        "additive": dict(attn_mask=additive),
        "finite_min": dict(attn_mask=torch.zeros(B, 1, S, S, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)),
        "float32_mask": dict(attn_mask=additive.float()),
        "causal_and_mask": dict(attn_mask=additive, is_causal=True),
        "scale": dict(attn_mask=allowed, scale=0.3),
        "per_step_mask": dict(attn_mask=torch.zeros(L, B, 1, S, S, dtype=dtype).masked_fill(
            torch.rand(L, B, 1, S, S) > 0.6, NEG)),
    }


def _inputs(case, dtype, rank=4, gqa=False):
    torch.manual_seed(0)
    shape = (L, B, H, S, D) if rank == 4 else (L, H, S, D)
    q = torch.randn(shape, dtype=dtype)
    kv_shape = shape[:-3] + (1,) + shape[-2:] if gqa else shape
    k, v = torch.randn(kv_shape, dtype=dtype), torch.randn(kv_shape, dtype=dtype)
    options = dict(_masks(dtype)[case])
    if rank == 3 and "attn_mask" in options and options["attn_mask"].dim() >= 4:  # (1, S, S) / (L, 1, S, S)
        options["attn_mask"] = options["attn_mask"].select(-4, 1)
    if gqa:
        options["enable_gqa"] = True
    per_step = options.pop("attn_mask") if case == "per_step_mask" else None
    return (q, k, v), per_step, options


def _fns(per_step, options):
    """(batched, eager) functions of (q, k, v), over the L steps."""
    def batched(q, k, v):
        if per_step is None:
            return vmap(lambda q, k, v: batched_sdpa(q, k, v, **options))(q, k, v)
        return vmap(lambda q, k, v, m: batched_sdpa(q, k, v, attn_mask=m, **options))(q, k, v, per_step)

    def eager(q, k, v):
        masks = [per_step[i] for i in range(L)] if per_step is not None else [None] * L
        return torch.stack([F.scaled_dot_product_attention(q[i], k[i], v[i], **options) if m is None else
                            F.scaled_dot_product_attention(q[i], k[i], v[i], attn_mask=m, **options)
                            for i, m in enumerate(masks)])

    return batched, eager


def _no_fallback(fn, *args):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args)
    assert not [w for w in caught if "batching rule" in str(w.message)]
    return out


CASES = [(case, 4, False) for case in _masks(torch.float64)] + [
    ("none", 4, True), ("bool", 4, True), ("causal", 4, True),  # grouped-query attention (flash handles it)
    ("bool", 3, False), ("per_step_mask", 3, True),  # eager picks its math kernel: eager's own call, batched
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case,rank,gqa", CASES)
def test_forward_and_gradients_equal_eager(case, rank, gqa, dtype):
    inputs, per_step, options = _inputs(case, dtype, rank, gqa)
    batched, eager = _fns(per_step, options)
    flash = rank == 4  # eager's CPU choice: flash for 4-D inputs; its numbers exactly, math's to rounding
    close = (lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=0)) if flash else torch.testing.assert_close
    want = eager(*inputs)
    close(_no_fallback(batched, *inputs), want)
    if case in ("bool", "additive", "causal_and_mask") and rank == 4:
        assert want[:, 0, :, 1].abs().max() == 0  # the fully masked row: 0, as eager gives it

    cotangents = torch.randn((4,) + want.shape, dtype=dtype)
    (got, pull), (_, pull_eager) = _no_fallback(vjp, batched, *inputs), vjp(eager, *inputs)
    for a, b in zip(_no_fallback(pull, cotangents[0]), pull_eager(cotangents[0])):  # parameter gradients
        close(a, b)
    rows, rows_eager = _no_fallback(vmap(pull), cotangents), [pull_eager(c) for c in cotangents]  # Jacobian rows
    for j in range(3):
        close(rows[j], torch.stack([r[j] for r in rows_eager]))

    if per_step is None:  # a vjp inside vmap (each step's own pullback), with a shared mask
        def one(q, k, v):
            out, pull = vjp(lambda *t: batched_sdpa(*t, **options), q, k, v)
            return pull(torch.ones_like(out))

        leaves = [x.detach().clone().requires_grad_() for x in inputs]
        eager(*leaves).sum().backward()
        for a, leaf in zip(_no_fallback(vmap(one), *inputs), leaves):
            close(a, leaf.grad)


@pytest.mark.parametrize("case", ["bool", "causal", "additive"])
def test_traced_with_make_fx_and_functionalize(case):
    """The compiled iteration's tracer (``runtime/backend.trace``: make_fx over functionalize, inductor's
    decompositions) records batched ops, not one attention per step, and reproduces eager's numbers to
    rounding, fully masked rows included."""
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    inputs, _, options = _inputs(case, torch.float64)
    batched, eager = _fns(None, options)
    cotangents = torch.randn((4,) + eager(*inputs).shape, dtype=torch.float64)

    def iteration(q, k, v, c):
        out, pull = vjp(batched, q, k, v)
        return out, vmap(pull)(c)

    gm = _no_fallback(make_fx(torch.func.functionalize(iteration, remove="mutations"),
                              decomposition_table=select_decomp_table()), *inputs, cotangents)
    assert not [n for n in gm.graph.nodes if "attention" in str(n.target)]
    assert len([n for n in gm.graph.nodes if str(n.target) == "aten.exp.default"]) == 1  # one softmax for all steps
    out, rows = gm(*inputs, cotangents)
    torch.testing.assert_close(out, eager(*inputs))
    _, pull_eager = vjp(eager, *inputs)
    for j in range(3):
        torch.testing.assert_close(rows[j], torch.stack([pull_eager(c)[j] for c in cotangents]))


@pytest.mark.parametrize("case,rank", [("bool", 4), ("causal", 4), ("additive", 4)])
def test_gradcheck_float64(case, rank):
    inputs, _, options = _inputs(case, torch.float64, rank)
    batched, _ = _fns(None, options)
    leaves = [x[:2, ..., :3, :].detach().clone().requires_grad_() for x in inputs]
    if "attn_mask" in options:
        options["attn_mask"] = options["attn_mask"][..., :3, :3]
    assert _no_fallback(torch.autograd.gradcheck, batched, leaves)


def test_outside_transforms_and_unsupported_are_eager_calls():
    inputs, _, options = _inputs("bool", torch.float64)
    q, k, v = (t[0] for t in inputs)
    assert torch.equal(batched_sdpa(q, k, v, **options), F.scaled_dot_product_attention(q, k, v, **options))
    with warnings.catch_warnings():  # dropout: random, so eager's own call (per sample under vmap)
        warnings.simplefilter("ignore")
        torch.manual_seed(3)
        a = vmap(lambda *t: batched_sdpa(*t, dropout_p=0.5), randomness="same")(*inputs)
        torch.manual_seed(3)
        b = vmap(lambda *t: F.scaled_dot_product_attention(*t, dropout_p=0.5), randomness="same")(*inputs)
    assert torch.equal(a, b)


def test_kernel_choice_follows_eager():
    """The flash kernels run only where eager picks flash: not for 3-D inputs, nor where
    ``torch.nn.attention.sdpa_kernel`` forces the math kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    seen = []
    original = attention._flash
    try:
        attention._flash = lambda *a: seen.append(a[0].dim()) or original(*a)
        for rank, forced in ((4, False), (4, True), (3, False)):
            inputs, _, options = _inputs("bool", torch.float64, rank)
            batched, eager = _fns(None, options)
            seen.clear()
            with sdpa_kernel(SDPBackend.MATH if forced else [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
                torch.testing.assert_close(_no_fallback(batched, *inputs), eager(*inputs))
            assert bool(seen) == (rank == 4 and not forced), (rank, forced, seen)
    finally:
        attention._flash = original
