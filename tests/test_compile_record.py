"""The recording front end: a concrete run replayed as a graph."""
import pytest
import torch
import torch.nn as nn

import deeppcr_fx as deeppcr
from deeppcr_fx.passes.record import RecordFailure, record


class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        mask = torch.zeros(4, dtype=x.dtype)
        mask[1] = 2.0  # in-place on a fresh tensor: must be replayed, not lost
        noise = torch.randn(x.shape, dtype=x.dtype)  # drawn again on every replay
        return self.lin(x) * mask + noise


def test_replay_matches_and_shares_parameters():
    torch.manual_seed(0)
    model = Masked().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    gm, out = record(model, (x,))
    torch.manual_seed(7)
    replay = gm(x)
    torch.manual_seed(7)
    torch.testing.assert_close(replay, model(x), rtol=0, atol=0)
    assert gm.get_parameter("lin.weight") is model.lin.weight
    assert not any(name.startswith("_recorded") for name, _ in model.named_buffers())
    replay.sum().backward()
    assert model.lin.weight.grad is not None


def test_reading_input_values_fails():
    class Branchy(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(RecordFailure, match="data-dependent"):
        record(Branchy(), (torch.ones(2, 2),))


def test_hooks_removed_after_recording():
    model = Masked()
    record(model, (torch.randn(2, 4),))
    assert not model.lin._forward_hooks and not model.lin._forward_pre_hooks


class _ShapeReads(nn.Module):
    """Per-block work that reads only the state's shape, dtype and device, and a table built once with
    ``device=h.device`` from the first hidden state (as Llama's rotary embedding is)."""

    def __init__(self, depth=10, width=4):
        super().__init__()
        self.inp = nn.Linear(width, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        h = self.inp(x)
        table = torch.arange(h.shape[-1], device=h.device, dtype=h.dtype) / 10
        for block in self.blocks:
            bias = torch.ones_like(h) * 0.1 + table + h.new_zeros(h.shape)
            h = torch.tanh(block(h)) + bias
        return h


@pytest.mark.parametrize("front_end", ["symbolic", "record", "dynamo"])
def test_shape_reads_are_hoisted(front_end):
    torch.manual_seed(0)
    model = _ShapeReads().double()
    compiled = deeppcr.compile(model, policy="always", front_end=front_end)
    x = torch.randn(3, 4, dtype=torch.float64)
    compiled(x)
    (chain,) = compiled.report.rewritten
    assert chain.length == 10
    step = compiled.graph_module.get_submodule(chain.submodule).step
    assert [n.target.__name__ for n in step.graph.nodes if n.op == "call_function"] == ["linear", "tanh", "add"]
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-9, atol=1e-12)


class _Embedded(nn.Module):
    """Token ids in: the chain starts at the embedding's output."""

    def __init__(self, depth=10, width=4):
        super().__init__()
        self.embed = nn.Embedding(10, width)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, ids):
        h = self.embed(ids)
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return h


@pytest.mark.parametrize("front_end", ["symbolic", "record", "dynamo"])
def test_chains_start_at_an_embedding_of_token_ids(front_end):
    torch.manual_seed(0)
    model = _Embedded().double()
    compiled = deeppcr.compile(model, policy="always", front_end=front_end)
    ids = torch.randint(0, 10, (2, 5))
    compiled(ids)
    assert [c.length for c in compiled.report.rewritten] == [10], str(compiled.report)
    ids = torch.randint(0, 10, (2, 5))
    torch.testing.assert_close(compiled(ids), model(ids), rtol=1e-9, atol=1e-12)
