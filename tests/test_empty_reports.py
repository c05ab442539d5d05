"""Every report explains an empty result: where the finder looked and why nothing qualified."""
import torch
import torch.nn as nn

import deeppcr_fx as deeppcr


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


def test_a_path_without_bottlenecks():
    """Every block's output is kept for the end (a DenseNet-style concatenation): no single state value."""

    class Dense(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(6))

        def forward(self, x):
            outs = [x]
            for layer in self.layers:
                outs.append(torch.tanh(layer(outs[-1])) + outs[0])
            return torch.cat(outs, -1)

    notes = _notes(Dense(), (torch.randn(2, 4),))
    assert "no chain found from" in notes


def test_integer_inputs():
    notes = _notes(_Embedded(), (torch.randint(0, 10, (2, 5)),))
    assert "floating-point tensor input" in notes and "int64" in notes


def test_nothing_repeats():
    notes = _notes(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), (torch.randn(2, 4),))
    assert "no two consecutive blocks compute the same ops" in notes
