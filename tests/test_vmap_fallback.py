"""Stats say when vmap only looked batched: an op without a batching rule (CPU scaled_dot_product_attention
on per-sample 4-D inputs) is evaluated per sample by vmap itself; the solve is exact either way."""
import pytest
import torch
import torch.nn.functional as F

import deeppcr_fx as deeppcr

L, B, H, S, D = 12, 2, 2, 4, 8


def _attention_step(z, W):
    q = (z @ W).view(B, H, S, D)  # a fixed batch size, as traced graphs have: vmap batches the steps
    return z + 0.1 * torch.tanh(F.scaled_dot_product_attention(q, z, z))


@pytest.mark.parametrize("mode", ["identity", "full"])
def test_per_sample_fallback_is_reported(mode):
    torch.manual_seed(0)
    x0 = torch.randn(B, H, S, D, dtype=torch.float64)
    W = torch.randn(L, D, D, dtype=torch.float64) / D ** 0.5
    res = deeppcr.solve(_attention_step, x0, per_step=(W,), jacobian=mode)
    ref = x0
    for l in range(L):
        ref = _attention_step(ref, W[l])
    torch.testing.assert_close(res.states[-1], ref, rtol=1e-9, atol=1e-11)
    assert res.stats.vectorized is False
    assert "scaled_dot_product" in res.stats.vmap_error and "per sample" in res.stats.vmap_error


def test_batched_steps_stay_vectorized():
    torch.manual_seed(0)
    x0 = torch.randn(B, D, dtype=torch.float64)
    W = torch.randn(L, D, D, dtype=torch.float64) / D ** 0.5
    res = deeppcr.solve(lambda z, W: torch.tanh(z @ W).view(B, D), x0, per_step=(W,), jacobian="full")
    assert res.stats.vectorized is True and res.stats.vmap_error is None
