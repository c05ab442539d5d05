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


# --- the ways of asking autograd for gradients --------------------------------------------------------
# A compiled chain's stacked Parameters are inputs of the autograd graph (so every way of asking reaches
# them); a plain ``loss.backward()`` writes their ``.grad`` directly (fast), anything else goes through
# autograd's own AccumulateGrad nodes. Each case is compared with the eager model in float64.


class _Headed(nn.Module):
    """A chain of Linear+tanh layers (rewritten) between an input layer and a head (not in the chain)."""

    def __init__(self, depth=10, width=3):
        super().__init__()
        self.inp = nn.Linear(2, width)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, 1)
        self.unused = nn.Linear(1, 1)  # never called

    def forward(self, x):
        h = self.inp(x)
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return self.head(h)


def _headed():
    torch.manual_seed(0)
    model = _Headed().double()
    compiled = deeppcr.compile(model, policy="always")
    x = torch.randn(4, 2, dtype=torch.float64)
    compiled(x)
    assert len(compiled.report.rewritten) == 1
    return model, compiled, x


def _loss(fn, x):
    return (fn(x) ** 2).sum()


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def _chain_params(model):
    return [p for layer in model.layers for p in layer.parameters()]


def _direct_writes(compiled):
    """Whether the last backward wrote the chain's ``.grad`` directly (the flat groups' gradient buffers hold them)."""
    from deeppcr_fx.runtime.stacked import FLAT_GROUPS, StackedAttributes

    stacks = [m for m in compiled.graph_module.modules() if isinstance(m, StackedAttributes)]
    groups = [FLAT_GROUPS.get(m._tensors()) for m in stacks]
    return [g is not None and g.grads.buffer is not None for g in groups]


@pytest.mark.parametrize("which", ["all", "chain", "one_chain_weight", "head_and_chain_bias"])
def test_autograd_grad_reaches_any_subset_of_parameters(which):
    model, compiled, x = _headed()
    chain = _chain_params(model)
    subset = {"all": [p for n, p in model.named_parameters() if not n.startswith("unused")], "chain": chain,
              "one_chain_weight": [model.layers[3].weight],
              "head_and_chain_bias": [model.head.weight, model.layers[7].bias, model.inp.bias]}[which]
    got = torch.autograd.grad(_loss(compiled, x), subset)
    want = torch.autograd.grad(_loss(model, x), subset)
    for g, w in zip(got, want):
        _close(g, w)
    assert all(p.grad is None for p in model.parameters())  # autograd.grad writes no .grad


def test_autograd_grad_with_allow_unused():
    model, compiled, x = _headed()
    wanted = [model.layers[0].weight, model.unused.weight, model.head.bias]
    got = torch.autograd.grad(_loss(compiled, x), wanted, allow_unused=True)
    want = torch.autograd.grad(_loss(model, x), wanted, allow_unused=True)
    assert got[1] is None and want[1] is None
    _close(got[0], want[0])
    _close(got[2], want[2])
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("which", ["chain_weight", "chain_and_head", "all_chain"])
def test_backward_with_inputs_fills_only_those(which):
    model, compiled, x = _headed()
    chain = _chain_params(model)
    chosen = {"chain_weight": [model.layers[5].weight], "chain_and_head": [model.layers[2].bias, model.head.weight],
              "all_chain": chain}[which]
    _loss(model, x).backward(inputs=chosen)
    want = {id(p): p.grad.clone() for p in chosen}
    model.zero_grad(set_to_none=True)
    _loss(compiled, x).backward(inputs=chosen)
    for p in model.parameters():
        if id(p) in want:
            _close(p.grad, want[id(p)])
        else:
            assert p.grad is None


def test_input_gradient_alone_writes_no_parameter_grad():
    model, compiled, x = _headed()
    x = x.requires_grad_()
    (got,) = torch.autograd.grad(_loss(compiled, x), x)
    (want,) = torch.autograd.grad(_loss(model, x), x)
    _close(got, want)
    assert all(p.grad is None for p in model.parameters())
    _loss(compiled, x).backward(inputs=[x])
    _close(x.grad, want)
    assert all(p.grad is None for p in model.parameters())


def test_plain_backward_writes_directly_and_accumulates():
    model, compiled, x = _headed()
    x2 = torch.randn_like(x)
    _loss(model, x).backward()
    _loss(model, x2).backward()
    want = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    _loss(compiled, x).backward()
    assert _direct_writes(compiled) == [True, True]  # the fast path is kept where it is safe
    _loss(compiled, x2).backward()
    got = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        _close(g, w)


def test_retain_graph_then_other_requests_on_the_same_graph():
    """One graph differentiated three ways: plain backward twice (retain_graph), then autograd.grad."""
    model, compiled, x = _headed()
    loss = _loss(model, x)
    loss.backward(retain_graph=True)
    loss.backward(retain_graph=True)
    want = [p.grad.clone() for p in _chain_params(model)]
    want_grad = torch.autograd.grad(loss, [model.layers[1].weight])[0]
    model.zero_grad(set_to_none=True)
    loss = _loss(compiled, x)
    loss.backward(retain_graph=True)
    loss.backward(retain_graph=True)
    for p, w in zip(_chain_params(model), want):
        _close(p.grad, w)
    before = [p.grad.clone() for p in _chain_params(model)]
    _close(torch.autograd.grad(loss, [model.layers[1].weight])[0], want_grad)
    for p, b in zip(_chain_params(model), before):  # autograd.grad left every .grad alone
        _close(p.grad, b)


def test_hooks_registered_between_forward_and_backward_fire():
    """Whether ``.grad`` may be written directly is decided in the backward pass: a hook registered after
    the forward pass still sees its gradient (and the Parameters then go through autograd)."""
    model, compiled, x = _headed()
    seen = {"hook": [], "post": []}
    loss = _loss(compiled, x)
    p, q = model.layers[4].weight, model.layers[6].bias
    p.register_hook(lambda g: seen["hook"].append(g.clone()))
    q.register_post_accumulate_grad_hook(lambda t: seen["post"].append(t.grad.clone()))
    loss.backward()
    assert len(seen["hook"]) == len(seen["post"]) == 1  # both fired in the compiled model's backward
    got = [t.grad.clone() for t in model.parameters() if t.grad is not None]
    model.zero_grad(set_to_none=True)
    _loss(model, x).backward()
    _close(seen["hook"][0], p.grad)
    _close(seen["post"][0], q.grad)
    want = [t.grad for t in model.parameters() if t.grad is not None]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        _close(g, w)


def test_plain_backward_only_leaves_the_parameters_out_of_the_graph():
    """``Config.plain_backward_only``: a plain backward still gives eager's gradients (accumulated), and
    the Parameters are not in the autograd graph (``autograd.grad`` on them says so)."""
    torch.manual_seed(0)
    model = _Headed().double()
    compiled = deeppcr.compile(model, policy="always", plain_backward_only=True)
    x, x2 = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    _loss(model, x).backward()
    _loss(model, x2).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    _loss(compiled, x).backward()
    _loss(compiled, x2).backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    for n in want:
        _close(got[n], want[n])
    with pytest.raises(RuntimeError, match="not have been used"):
        torch.autograd.grad(_loss(compiled, x), [model.layers[3].weight])
