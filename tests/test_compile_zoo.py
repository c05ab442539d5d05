"""The zoo through the symbolic front end: structure, numerics and gradients vs the original model."""
import pytest
import torch

import deeppcr_fx as deeppcr
from compile_helpers import check_numerics, check_structure
from compile_zoo import ZOO


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_float64(name):
    torch.manual_seed(0)
    model, inputs, expected = ZOO[name]()
    compiled = deeppcr.compile(model, policy="always")
    check_numerics(model, compiled, inputs, torch.float64)
    assert compiled.report.front_end == "symbolic"
    check_structure(compiled, expected)
    for rec in compiled.report.rewritten:
        assert compiled.graph_module.get_submodule(rec.submodule).last_stats is not None


@pytest.mark.parametrize("name", ["mlp", "residual", "transformer", "conditioning"])
def test_zoo_float32(name):
    torch.manual_seed(0)
    model, inputs, expected = ZOO[name](dtype=torch.float32)
    compiled = deeppcr.compile(model, policy="always")
    check_numerics(model, compiled, inputs, torch.float32)
    check_structure(compiled, expected)


@pytest.mark.parametrize("jacobian", ["full", "diag", "identity", "zero"])
def test_jacobian_modes_are_exact(jacobian):
    torch.manual_seed(0)
    model, inputs, expected = ZOO["residual"](L=10)
    compiled = deeppcr.compile(model, policy="always", jacobian=jacobian)
    check_numerics(model, compiled, inputs, torch.float64)
    assert [r.jacobian for r in compiled.report.rewritten] == [jacobian]
    solve = compiled.graph_module.get_submodule(compiled.report.rewritten[0].submodule)
    assert solve.last_stats.jacobian == jacobian


def test_hidden_states_returned():
    """Every intermediate state used after the chain comes out of the solve by index."""

    class AllStates(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(6, 6) for _ in range(8))

        def forward(self, x):
            states = []
            for layer in self.layers:
                x = torch.tanh(layer(x))
                states.append(x)
            return torch.stack(states)

    torch.manual_seed(0)
    model = AllStates().double()
    compiled = deeppcr.compile(model, policy="always")
    check_numerics(model, compiled, (torch.randn(2, 6, dtype=torch.float64),), torch.float64)
    check_structure(compiled, [(8, 2)])


def test_period_is_structural_not_by_name():
    """A transformer layer written flat (no submodule per layer) is found with the same period."""
    torch.manual_seed(0)
    model, inputs, _ = ZOO["transformer"](L=8)
    blocks = [m for layer in model.blocks for m in (layer.attn, layer.mlp)]
    from compile_zoo import Stack

    flat = Stack(blocks)
    compiled = deeppcr.compile(flat, policy="always")
    check_numerics(flat, compiled, inputs, torch.float64, gradients=False)
    check_structure(compiled, [(8, 2)])


def test_torch_transformer_encoder_is_recorded():
    """nn.TransformerEncoder cannot be traced symbolically (mask canonicalisation inspects types);
    the recording front end captures it and finds the 8 layers (4 cut pieces per layer)."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, num_layers=8, enable_nested_tensor=False).double().eval()
    compiled = deeppcr.compile(model, policy="always")
    check_numerics(model, compiled, (torch.randn(2, 3, 8, dtype=torch.float64),), torch.float64)
    assert compiled.report.front_end == "record"
    check_structure(compiled, [(8, 4)])


class MHABlock(torch.nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.norm, self.attn = torch.nn.LayerNorm(d), torch.nn.MultiheadAttention(d, 2, batch_first=True)

    def forward(self, x):
        h = self.norm(x)
        return x + self.attn(h, h, h, need_weights=False)[0]


def test_opaque_modules_inside_chains_switch_to_recording():
    """nn.MultiheadAttention stays opaque under symbolic tracing; compile() then records a run, which
    inlines it, and rewrites the chain."""
    from compile_zoo import Stack

    torch.manual_seed(0)
    model = Stack([MHABlock() for _ in range(8)]).double()
    compiled = deeppcr.compile(model, policy="always")
    check_numerics(model, compiled, (torch.randn(2, 3, 8, dtype=torch.float64),), torch.float64)
    assert compiled.report.front_end == "record"
    check_structure(compiled, [(8, 1)])
    symbolic = deeppcr.compile(model, policy="always", front_end="symbolic")
    symbolic(torch.randn(2, 3, 8, dtype=torch.float64))
    assert symbolic.report.reasons() == [deeppcr.Reason.OPAQUE_MODULE]
