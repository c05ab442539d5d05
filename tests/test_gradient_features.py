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


def test_distributed_data_parallel_gets_every_gradient(tmp_path):
    """DDP (gloo, 2 processes) over a compiled model: each rank's gradients are the all-reduced ones, the
    same on both ranks and equal to DDP over the eager model (direct .grad writes would bypass the hooks
    DDP puts on AccumulateGrad nodes, so under torch.distributed gradients go through autograd)."""
    import torch.multiprocessing as mp

    import ddp_worker

    mp.spawn(ddp_worker.run, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert all(r["compiled"]["rewritten"] for r in ranks)
    for step in range(3):
        for r in ranks:
            for got, want in zip(r["compiled"]["grads"][step], r["eager"]["grads"][step]):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        for a, b in zip(ranks[0]["compiled"]["grads"][step], ranks[1]["compiled"]["grads"][step]):
            torch.testing.assert_close(a, b)


def test_post_accumulate_grad_hooks_fire_with_the_gradients():
    """FSDP-style hooks on AccumulateGrad (register_post_accumulate_grad_hook) see every chain Parameter's
    gradient, as in eager."""
    model = _mlp()
    compiled = deeppcr.compile(model, policy="always")
    x = torch.randn(2, 4)
    compiled(x)  # specialise first: the hooks are registered on a compiled model
    seen = {}
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda t, name=name: seen.__setitem__(name, t.grad.clone()))
    compiled(x).pow(2).sum().backward()
    assert compiled.report.rewritten and len(seen) == len(list(model.parameters()))
    got = dict(seen)
    seen.clear()
    model.zero_grad(set_to_none=True)
    model(x).pow(2).sum().backward()
    for name in got:
        torch.testing.assert_close(got[name], seen[name], rtol=1e-5, atol=1e-6)


def test_autocast_computes_what_eager_autocast_computes():
    """Under torch.autocast the chain runs as eager autocast runs it (reason ``autocast``); outside it the
    same compiled module solves in parallel. Training included."""
    model = _mlp()
    compiled = deeppcr.compile(model, policy="always")
    x = torch.randn(3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = compiled(x)
    assert compiled.report.reasons() == [deeppcr.Reason.AUTOCAST]
    y.float().pow(2).sum().backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(x)
    ref.float().pow(2).sum().backward()
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref)
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad)
    compiled(x)
    assert compiled.report.rewritten
