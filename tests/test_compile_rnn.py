"""RNN cells over time, written as users write them: ``h0`` built inside forward, a loop over ``x[:, t]``.

The loop's state starts from a constant (a chain start since it is a floating tensor built from
constants), the per-step inputs ``x[:, t]`` are hoisted and stacked, and fused cells
(``torch.gru_cell``, ``rnn_tanh_cell``), which vmap cannot batch, run as plain ops.
"""
import warnings

import pytest
import torch
import torch.nn as nn

import deeppcr_fx as deeppcr


class _OverTime(nn.Module):
    def __init__(self, cell: nn.Module, hidden: int):
        super().__init__()
        self.cell, self.hidden = cell, hidden

    def forward(self, x):
        h = torch.zeros(x.shape[0], self.hidden, dtype=x.dtype)
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
        return h


class _Elman(nn.Module):
    """A hand-written cell."""

    def __init__(self, inputs: int, hidden: int):
        super().__init__()
        self.w_in, self.w_h = nn.Linear(inputs, hidden), nn.Linear(hidden, hidden, bias=False)

    def forward(self, x, h):
        return torch.tanh(self.w_in(x) + self.w_h(h))


CELLS = {"gru": lambda: nn.GRUCell(3, 4), "rnn_tanh": lambda: nn.RNNCell(3, 4),
         "rnn_relu": lambda: nn.RNNCell(3, 4, nonlinearity="relu"), "elman": lambda: _Elman(3, 4)}


@pytest.mark.parametrize("kind", sorted(CELLS))
def test_cell_over_time_is_rewritten_and_batched(kind):
    torch.manual_seed(0)
    model = _OverTime(CELLS[kind](), 4).double()
    compiled = deeppcr.compile(model, policy="always")
    x = torch.randn(2, 40, 3, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = compiled(x)
    assert not [w for w in caught if "batching rule" in str(w.message)]  # no per-step vmap fallback
    (record,) = compiled.report.chains
    assert record.status == "rewritten" and record.length == 40
    torch.testing.assert_close(y, model(x), rtol=1e-9, atol=1e-10)
    y.pow(2).sum().backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]
    x.grad = None
    model.zero_grad(set_to_none=True)
    model(x).pow(2).sum().backward()
    for g, want in zip(got, [x.grad] + [p.grad for p in model.parameters()]):
        torch.testing.assert_close(g, want, rtol=1e-8, atol=1e-10)
    stats = compiled.stats()[0].solves[-1]
    assert stats.vectorized and stats.vmap_error is None


def test_warm_starts_back_off_when_fresh_inputs_never_meet_the_guess():
    """A chain driven by fresh per-step inputs never meets the previous call's trajectory: the warm start's
    sequential prefix (L / 16 steps) buys nothing, so after one miss the next calls start cold."""
    from deeppcr_fx.runtime.pcr_solve import COLD_AFTER_MISS

    torch.manual_seed(0)
    model = _OverTime(nn.GRUCell(3, 2), 2)
    compiled = deeppcr.compile(model, policy="always")
    with torch.no_grad():
        for _ in range(4):
            x = torch.randn(1, 200, 3)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    solves = compiled.stats()[0].solves
    assert not solves[0].warm_start  # nothing to start from
    assert solves[1].warm_start and solves[1].forward.guess_met is False and solves[1].forward.prefix == 12
    assert not any(s.warm_start for s in solves[2:]) and COLD_AFTER_MISS >= 2


# --- states of several tensors (passes/find_states.py) -------------------------------------------------
class _LSTMOverTime(nn.Module):
    def __init__(self, inputs: int, hidden: int):
        super().__init__()
        self.cell, self.hidden = nn.LSTMCell(inputs, hidden), hidden

    def forward(self, x):
        h = torch.zeros(x.shape[0], self.hidden, dtype=x.dtype)
        c = torch.zeros(x.shape[0], self.hidden, dtype=x.dtype)
        for t in range(x.shape[1]):
            h, c = self.cell(x[:, t], (h, c))
        return h + 0.5 * c


class _LSTMSequence(_LSTMOverTime):
    """Every step's output kept (``torch.stack(outputs)``, as ``nn.LSTM`` returns them), and the last cell state."""

    def forward(self, x):
        h = torch.zeros(x.shape[0], self.hidden, dtype=x.dtype)
        c = torch.zeros(x.shape[0], self.hidden, dtype=x.dtype)
        outputs = []
        for t in range(x.shape[1]):
            h, c = self.cell(x[:, t], (h, c))
            outputs.append(h)
        return torch.stack(outputs, 1), c


class _Oscillator(nn.Module):
    """A hand-written two-tensor state: position and velocity under a learned force (symplectic Euler)."""

    def __init__(self, w: int, steps: int, dt: float = 0.1):
        super().__init__()
        self.force, self.steps, self.dt = nn.Sequential(nn.Linear(w, w), nn.Tanh(), nn.Linear(w, w)), steps, dt

    def forward(self, x):
        v = torch.zeros_like(x)
        for _ in range(self.steps):
            v = 0.9 * v + self.dt * self.force(x)
            x = x + self.dt * v
        return x, v


def _outputs_and_grads(model, x, out):
    loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).reshape(o.shape)).sum()
               for o in (out if isinstance(out, tuple) else (out,)))
    return [o.detach() for o in (out if isinstance(out, tuple) else (out,))], \
        torch.autograd.grad(loss, [x] + list(model.parameters()))


@pytest.mark.parametrize("case", ["lstm", "lstm_sequence", "oscillator"])
def test_states_of_two_tensors_are_rewritten(case):
    torch.manual_seed(0)
    if case.startswith("lstm"):
        cls = _LSTMOverTime if case == "lstm" else _LSTMSequence
        model, x, L = cls(3, 4).double(), torch.randn(2, 30, 3, dtype=torch.float64), 30
    else:
        model, x, L = _Oscillator(4, 24).double(), torch.randn(3, 4, dtype=torch.float64), 24
    x.requires_grad_(True)
    compiled = deeppcr.compile(model, policy="always")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _outputs_and_grads(model, x, compiled(x))
    assert not [w for w in caught if "batching rule" in str(w.message)]  # lstm_cell decomposed: batched
    want = _outputs_and_grads(model, x, model(x))
    (record,) = compiled.report.chains
    assert record.status == "rewritten" and record.length == L and record.state.startswith("(")
    solve = compiled.graph_module.get_submodule(record.submodule)
    assert solve.length == L and "getitem" in str(solve.step.code)  # the step unpacks the tuple state
    for g, w in zip(got[0] + list(got[1]), want[0] + list(want[1])):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)
    stats = compiled.stats()[0].solves[-1]
    assert stats.vectorized and stats.vmap_error is None


@pytest.mark.parametrize("case", ["lstm", "oscillator"])
def test_states_of_two_tensors_through_torchdynamo(case):
    torch.manual_seed(0)
    if case == "lstm":
        model, x, L = _LSTMOverTime(3, 4).double(), torch.randn(2, 12, 3, dtype=torch.float64), 12
    else:
        model, x, L = _Oscillator(4, 12).double(), torch.randn(3, 4, dtype=torch.float64), 12
    compiled = deeppcr.compile(model, policy="always", front_end="dynamo")
    got, want = compiled(x), model(x)
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)
    (record,) = compiled.report.chains
    assert compiled.report.front_end == "dynamo" and record.status == "rewritten" and record.length == L
    assert record.state.startswith("(")
