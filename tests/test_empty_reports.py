"""Every report explains an empty result: where the finder looked and why nothing qualified."""
import torch
import torch.nn as nn

import deeppcr_fx as deeppcr


class _RNN(nn.Module):
    """A GRU cell over time whose initial state is built inside forward."""

    def __init__(self):
        super().__init__()
        self.cell = nn.GRUCell(3, 4)

    def forward(self, x):
        h = torch.zeros(x.shape[0], 4)
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
        return h


class _Embedded(nn.Module):
    """Token ids in, a stack of layers on their embedding."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(10))

    def forward(self, ids):
        h = self.embed(ids)
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return h


def _notes(model, inputs):
    report = deeppcr.explain(model, inputs, policy="always")
    assert report.chains == [] and report.notes
    assert all(n in str(report) for n in report.notes)
    return " ".join(report.notes)


def test_state_built_inside_forward():
    notes = _notes(_RNN(), (torch.randn(2, 12, 3),))
    assert "no chain found from x" in notes and "built inside forward" in notes


def test_integer_inputs():
    notes = _notes(_Embedded(), (torch.randint(0, 10, (2, 5)),))
    assert "floating-point tensor input" in notes and "int64" in notes


def test_nothing_repeats():
    notes = _notes(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), (torch.randn(2, 4),))
    assert "no two consecutive blocks compute the same ops" in notes
