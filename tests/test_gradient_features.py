"""Gradients through compiled chains under the torch features users combine them with."""
import pytest
import torch
import torch.nn as nn

import deeppcr_fx as deeppcr


def _mlp(depth=10, width=4):
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(width, width), nn.Tanh())])


@pytest.mark.parametrize("grad", [False, True])
def test_empty_batch_returns_what_eager_returns(grad):
    model = _mlp()
    compiled = deeppcr.compile(model, policy="always")
    x = torch.randn(0, 4, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        y, ref = compiled(x), model(x)
    assert y.shape == ref.shape == (0, 4) and compiled.report.rewritten
    if grad:
        y.sum().backward()
        got = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        ref.sum().backward()
        for g, p in zip(got, model.parameters()):
            torch.testing.assert_close(g, p.grad)


def test_empty_batch_in_solve():
    W = torch.randn(6, 3, 3, requires_grad=True)
    res = deeppcr.solve(lambda z, w: torch.tanh(z @ w.T), torch.zeros(0, 3), per_step=(W,))
    assert res.states.shape == (6, 0, 3)
    res.states.sum().backward()
    assert W.grad is not None and torch.count_nonzero(W.grad) == 0


@pytest.mark.parametrize("reentrant", [True, False])
def test_a_first_call_inside_checkpoint_does_not_stick(reentrant):
    """Non-reentrant checkpointing runs the forward under saved-tensor hooks, which torch.func refuses:
    that call keeps the chain sequential, and later calls outside it are solved in parallel."""
    from torch.utils.checkpoint import checkpoint

    model = _mlp()
    compiled = deeppcr.compile(model, policy="always")
    x = torch.randn(2, 4, requires_grad=True)
    y = checkpoint(compiled, x, use_reentrant=reentrant)
    y.sum().backward()
    got = x.grad.clone()
    x.grad = None
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()
    torch.testing.assert_close(got, x.grad, rtol=1e-5, atol=1e-6)
    compiled(x)
    assert compiled.report.rewritten and not compiled.report.refused
