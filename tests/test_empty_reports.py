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
    """Every block reads every earlier block's output (a DenseNet): no small state passes from block to block."""

    class Dense(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(4 * (i + 1), 4) for i in range(6))

        def forward(self, x):
            outs = [x]
            for layer in self.layers:
                outs.append(torch.tanh(layer(torch.cat(outs, -1))))
            return torch.cat(outs, -1)

    notes = _notes(Dense(), (torch.randn(2, 4),))
    assert "no chain found from" in notes and "at most 8 tensors" in notes


def test_outputs_kept_for_the_end_still_leave_a_state():
    """Each block's output is kept for a final concatenation and every block reads the input: the input is a
    shared value, the concatenation reads the solved states (found since states of several tensors are)."""

    class Kept(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(6))

        def forward(self, x):
            outs = [x]
            for layer in self.layers:
                outs.append(torch.tanh(layer(outs[-1])) + outs[0])
            return torch.cat(outs, -1)

    torch.manual_seed(0)
    model = Kept().double()
    x = torch.randn(2, 4, dtype=torch.float64)
    compiled = deeppcr.compile(model, policy="always", min_length=2)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-10, atol=1e-12)
    assert compiled.report.rewritten


def test_integer_inputs():
    """Only integers flow: no floating tensor anywhere to start a chain from."""

    class Counting(nn.Module):
        def forward(self, ids):
            for _ in range(10):
                ids = ids * 3 + 1
            return ids

    notes = _notes(Counting(), (torch.randint(0, 10, (2, 5)),))
    assert "floating-point tensor input" in notes and "int64" in notes


def test_an_embedding_of_token_ids_starts_a_chain():
    """Token ids in: the chain starts at the first floating tensor computed from them (the embedding)."""
    torch.manual_seed(0)
    model = _Embedded()
    ids = torch.randint(0, 10, (2, 5))
    compiled = deeppcr.compile(model, policy="always")
    torch.testing.assert_close(compiled(ids), model(ids), rtol=1e-5, atol=1e-6)
    assert [c.length for c in compiled.report.rewritten] == [10]


def test_many_chain_starts_are_summarised():
    """A graph with dozens of chain starts (a sampler's schedule constants) explains the longest paths only."""

    class Constants(nn.Module):
        def forward(self, x):
            for i, op in enumerate((torch.sin, torch.cos, torch.tanh, torch.sigmoid, torch.relu, torch.abs, torch.exp)):
                x = op(x * torch.full((1,), float(i + 2)))
            return x

    notes = _notes(Constants(), (torch.randn(2, 4),))
    assert "more chain starts with shorter paths" in notes


def test_nothing_repeats():
    notes = _notes(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), (torch.randn(2, 4),))
    assert "no two consecutive blocks compute the same ops" in notes
