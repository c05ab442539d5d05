"""ODE solver loops as users write them: the time enters each step as ``torch.full_like(x[:, :1], t)``.

The per-step time is a Python float that differs per step (a coefficient slot); ``full_like`` wants
a number, so the step template fills with ``ones_like(x) * t`` instead (the same values).
"""
import pytest
import torch
import torch.nn as nn

import deeppcr_fx as deeppcr


class _Field(nn.Module):
    def __init__(self, n=4, hidden=16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n + 1, hidden), nn.Tanh(), nn.Linear(hidden, n))

    def forward(self, t, x):
        return self.net(torch.cat([x, torch.full_like(x[:, :1], t)], -1))


class _Euler(nn.Module):
    def __init__(self, steps=20):
        super().__init__()
        self.f, self.steps = _Field(), steps

    def forward(self, x):
        dt = 1.0 / self.steps
        for i in range(self.steps):
            x = x + dt * self.f(i * dt, x)
        return x


class _RK4(_Euler):
    def forward(self, x):
        h = 1.0 / self.steps
        for i in range(self.steps):
            t = i * h
            k1 = self.f(t, x)
            k2 = self.f(t + h / 2, x + h / 2 * k1)
            k3 = self.f(t + h / 2, x + h / 2 * k2)
            k4 = self.f(t + h, x + h * k3)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return x


@pytest.mark.parametrize("solver", [_Euler, _RK4])
def test_fixed_step_solver_is_rewritten(solver):
    torch.manual_seed(0)
    model = solver().double()
    compiled = deeppcr.compile(model, policy="always")
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    y = compiled(x)
    (record,) = compiled.report.chains
    assert record.status == "rewritten" and record.length == 20
    assert any(i.kind == "coefficient" for i in record.inputs)
    torch.testing.assert_close(y, model(x), rtol=1e-8, atol=1e-9)
    y.pow(2).sum().backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]
    x.grad = None
    model.zero_grad(set_to_none=True)
    model(x).pow(2).sum().backward()
    for g, want in zip(got, [x.grad] + [p.grad for p in model.parameters()]):
        torch.testing.assert_close(g, want, rtol=1e-7, atol=1e-9)


# --- per-step floats where an op wants a Python number (passes/scalar_args.py) ---------------------------
SCALAR_OPS = {
    "add_alpha": lambda h, c: torch.add(h, torch.tanh(h), alpha=c),
    "addcmul_value": lambda h, c: torch.addcmul(h, h, torch.tanh(h), value=c),
    "leaky_relu": lambda h, c: torch.nn.functional.leaky_relu(h, c),
    "hardtanh": lambda h, c: torch.nn.functional.hardtanh(h, -1 - c, 1 + c),
    "elu": lambda h, c: torch.nn.functional.elu(h, alpha=1 + c),
    "softplus": lambda h, c: torch.nn.functional.softplus(h, beta=1 + c, threshold=1.0),
    "full_like": lambda h, c: h + torch.full_like(h[:, :1], c),
}


class _Scheduled(nn.Module):
    """A loop whose i-th step reads the Python float 0.1 * (i + 1) in a Scalar argument."""

    def __init__(self, op, steps=10, n=4):
        super().__init__()
        self.lin, self.op, self.steps = nn.Linear(n, n), op, steps

    def forward(self, x):
        for i in range(self.steps):
            x = self.op(self.lin(x), 0.1 * (i + 1))
        return x


@pytest.mark.parametrize("name", sorted(SCALAR_OPS))
def test_per_step_floats_in_scalar_arguments(name):
    torch.manual_seed(0)
    model = _Scheduled(SCALAR_OPS[name]).double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    compiled = deeppcr.compile(model, policy="always")
    out = compiled(x)
    (record,) = compiled.report.chains
    assert record.status == "rewritten", record.detail  # before: unstackable_input, Tensor.item() on meta tensors
    assert [i.kind for i in record.inputs].count("coefficient") >= 1
    want = model(x)
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-10)
    got_grads = torch.autograd.grad(out.sum(), [x, *model.parameters()])
    want_grads = torch.autograd.grad(want.sum(), [x, *model.parameters()])
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)
