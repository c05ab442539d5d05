"""torchdiffeq's fixed-grid solvers inside a model's forward: found, rewritten, exact in float64.

``odeint(func, y0, t, method="euler" | "rk4")`` allocates ``solution = torch.empty(len(t), ...)`` and
writes ``solution[j] = y_j`` after each step. Symbolic tracing cannot follow it (its input checks),
so the default front end records one run; the per-step row writes are a collector
(``passes/collector_writes.py``): left out of the steps, moved after the parallel solve, where they
write the solved states. Outputs and parameter gradients equal eager's, for the whole trajectory and
for its last state. A loop that reads its buffer while filling it is refused with that reason.
"""
import pytest
import torch
import torch.nn as nn

import deeppcr_fx as deeppcr

torchdiffeq = pytest.importorskip("torchdiffeq")

STEPS = 12


class Field(nn.Module):
    """dy/dt = tanh(W [y, t] + b): the time enters every step (a per-step input of the solve)."""

    def __init__(self, width=4):
        super().__init__()
        self.lin = nn.Linear(width + 1, width)

    def forward(self, t, y):
        return torch.tanh(self.lin(torch.cat([y, t.expand(y.shape[0], 1)], -1)))


class ODE(nn.Module):
    def __init__(self, method, whole, steps=STEPS):
        super().__init__()
        self.f, self.method, self.whole = Field(), method, whole
        self.register_buffer("t", torch.linspace(0, 1, steps + 1))

    def forward(self, y0):
        ys = torchdiffeq.odeint(self.f, y0, self.t, method=self.method)
        return ys if self.whole else ys[-1]


def _close(got, want, tol=1e-9):  # the solve's float64 tolerance is rtol 1e-10 per step
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(1.0, float(want.detach().abs().max())))


@pytest.mark.parametrize("whole", [True, False], ids=["trajectory", "last"])
@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_odeint_fixed_grid(method, whole):
    torch.manual_seed(0)
    model = ODE(method, whole).double()
    compiled = deeppcr.compile(model, policy="always")
    compiled(torch.randn(3, 4, dtype=torch.float64))  # specialises (the recorded run's output is eager's)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    out, ref = compiled(x), model(x)
    assert out.shape == ((STEPS + 1, 3, 4) if whole else (3, 4))
    _close(out, ref)
    report = compiled.report
    assert report.front_end == "record"
    assert [(r.length, r.period, r.state.count(",") + 1) for r in report.rewritten] == [(STEPS, 1, 1)]
    solve = compiled.graph_module.get_submodule(report.rewritten[0].submodule)
    assert solve.last_stats.forward.converged or solve.last_stats.forward.sequential_finish is not None
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    params = [x] + list(model.parameters())
    got = torch.autograd.grad((compiled(x) * weights).sum(), params)
    want = torch.autograd.grad((model(x) * weights).sum(), params)
    for g, w in zip(got, want):
        _close(g, w)


class ReadsWhileFilling(nn.Module):
    """A loop that writes rows of a buffer and reads an earlier row back: the writes cannot move."""

    def __init__(self, steps=10):
        super().__init__()
        self.lin, self.steps = nn.Linear(4, 4), steps

    def forward(self, x):
        sol = torch.empty(self.steps + 1, *x.shape, dtype=x.dtype)
        sol[0] = x
        for j in range(self.steps):
            x = torch.tanh(self.lin(x)) + 0.5 * sol[j]
            sol[j + 1] = x
        return sol


def test_buffer_read_while_filled_is_explained():
    model = ReadsWhileFilling().double()
    compiled = deeppcr.compile(model, policy="always", front_end="record", min_length=2)
    compiled(torch.randn(3, 4, dtype=torch.float64))
    x = torch.randn(3, 4, dtype=torch.float64)
    _close(compiled(x), model(x))
    assert not compiled.report.rewritten
    notes = " ".join(compiled.report.notes)
    assert "differ in integer constants" in notes and "before its last write" in notes, notes
