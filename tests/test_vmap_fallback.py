"""Stats say when vmap only looked batched: an op without a batching rule (CPU scaled_dot_product_attention
on per-sample 4-D inputs, called as it is in a step handed to ``deeppcr.solve``) is evaluated per sample by
vmap itself; the solve is exact either way. The same step with ``runtime.attention``'s version, and the
attention of a compiled chain (its step template uses that version: ``passes/decompose.py``) are batched."""
import pytest
import torch
import torch.nn.functional as F

import deeppcr_fx as deeppcr
from deeppcr_fx.runtime.attention import scaled_dot_product_attention

L, B, H, S, D = 12, 2, 2, 4, 8


def _attention_step(z, W, sdpa=F.scaled_dot_product_attention):
    q = (z @ W).view(B, H, S, D)  # a fixed batch size, as traced graphs have: vmap batches the steps
    return z + 0.1 * torch.tanh(sdpa(q, z, z))


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


@pytest.mark.parametrize("mode", ["identity", "full"])
def test_batched_attention_is_vectorized_and_exact(mode):
    torch.manual_seed(0)
    x0 = torch.randn(B, H, S, D, dtype=torch.float64, requires_grad=True)
    W = (torch.randn(L, D, D, dtype=torch.float64) / D ** 0.5).requires_grad_()
    step = lambda z, W: _attention_step(z, W, scaled_dot_product_attention)  # noqa: E731
    res = deeppcr.solve(step, x0, per_step=(W,), jacobian=mode)
    ref = x0
    for l in range(L):
        ref = _attention_step(ref, W[l])
    torch.testing.assert_close(res.states[-1], ref, rtol=1e-9, atol=1e-11)
    weights = torch.randn_like(ref)
    got = torch.autograd.grad((res.states[-1] * weights).sum(), (x0, W))
    for a, b in zip(got, torch.autograd.grad((ref * weights).sum(), (x0, W))):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    assert res.stats.vectorized is True and res.stats.vmap_error is None


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_compiled_transformers_attention_is_batched(name):
    """A compiled transformer's layers (transformers' default attention is SDPA) run truly batched."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(vocab_size=50, max_position_embeddings=16)
    model = {"gpt2": lambda: transformers.GPT2Model(transformers.GPT2Config(
                 n_layer=8, n_embd=8, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0)),
             "llama": lambda: transformers.LlamaModel(transformers.LlamaConfig(
                 num_hidden_layers=8, hidden_size=8, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=16, pad_token_id=0, bos_token_id=0, eos_token_id=0, **common)),
             "bert": lambda: transformers.BertModel(transformers.BertConfig(
                 num_hidden_layers=8, hidden_size=8, num_attention_heads=2, intermediate_size=16, pad_token_id=0,
                 **common))}[name]().double().eval()
    compiled = deeppcr.compile(model, policy="always")
    compiled(torch.randint(1, 50, (2, 5)))  # specialise
    ids = torch.randint(1, 50, (2, 5))
    torch.testing.assert_close(compiled(ids).last_hidden_state, model(ids).last_hidden_state,
                               rtol=1e-6, atol=1e-6)
    solves = [s for chain in compiled.stats() for s in chain.solves]
    assert solves and all(s.vectorized and s.vmap_error is None for s in solves), \
        [(s.vectorized, s.vmap_error) for s in solves]
