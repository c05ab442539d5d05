"""The CompileReport as data: chains and their inputs, decisions, refusals with remedies, JSON round trip,
the graph after each pass, and the emitted graph's code."""
import json

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import deeppcr_fx as deeppcr
from compile_zoo import ZOO, Residual, Stack, conditioning
from deeppcr_fx import Reason
from inspect_models import ddim_sampler, three_chains


def _explain(model, inputs, **options):
    options.setdefault("policy", "always")
    return deeppcr.explain(model, inputs, **options)


@pytest.mark.parametrize("name", ["mlp", "residual", "two_chains", "interrupted", "shared_weights"])
def test_zoo_chains_and_lengths(name):
    torch.manual_seed(0)
    model, inputs, expected = ZOO[name]()
    report = _explain(model, inputs)
    assert [(c.length, c.period) for c in report.rewritten] == expected
    for c in report.rewritten:
        assert c.status == "rewritten" and c.reason is None and c.remedy == ""
        assert c.end == c.replaced[-1] and c.start_module and c.end_module
        assert c.state_shape == tuple(inputs[0].shape) and c.dtype == "float64"
        assert c.decision.startswith("rewritten (policy='always')")
        assert c.cost["sequential_ms"] > 0 and c.cost["parallel_ms"] > 0 and c.cost["measured"] is None


def test_three_chains_modules_inputs_and_decisions():
    report = _explain(three_chains(), (torch.randn(2, 8),))
    assert [(c.length, c.period) for c in report.chains] == [(9, 1), (8, 1), (10, 2)]
    enc, blocks, head = report.chains
    assert (enc.start_module, enc.end_module) == ("encoder.0", "encoder.8")
    assert (blocks.start_module, blocks.end_module) == ("blocks.0", "blocks.7")
    assert [i.kind for i in enc.inputs] == ["per_step"] * 4 and enc.n_per_step == 4
    w = enc.inputs[0]
    assert (w.first, w.last, w.source, w.shape, w.dtype) == ("encoder_0_a_weight", "encoder_8_a_weight",
                                                             "parameter", (8, 8), "float32")
    assert [c.submodule for c in report.chains] == ["pcr_solve_0", "pcr_solve_1", "pcr_solve_2"]
    assert head.jacobian == "full" and not head.hoisted_inputs


def test_hoisted_and_shared_inputs():
    model, inputs, _ = conditioning()
    rec = _explain(model, inputs).chains[0]
    hoisted = rec.hoisted_inputs
    assert hoisted and all(i.kind == "per_step" and i.source == "computed" for i in hoisted)
    assert "hoisted" in str(_explain(model, inputs))

    class Shared(nn.Module):  # the same conditioning tensor read by every step
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(8))

        def forward(self, x, c):
            for b in self.blocks:
                x = torch.tanh(b(x) + c)
            return x

    rec = _explain(Shared().double(), (torch.randn(2, 8, dtype=torch.float64),
                                       torch.randn(2, 8, dtype=torch.float64))).chains[0]
    assert [(i.kind, i.first, i.source) for i in rec.shared_inputs] == [("shared", "c", "input")]


def test_diffusion_sampling_loop():
    report = _explain(ddim_sampler(), (torch.randn(2, 8),))
    (rec,) = report.chains
    assert (rec.length, rec.period, rec.status, rec.covers) == (10, 1, "rewritten", ("denoiser",))
    kinds = [(i.kind, i.source, i.hoisted) for i in rec.inputs]
    assert ("per_step", "computed", True) in kinds  # the timestep embedding, hoisted out of the solve
    assert ("per_step", "constant", False) in kinds  # the scheduler's coefficients
    assert [i.first for i in rec.shared_inputs] == ["denoiser_inp_weight", "denoiser_inp_bias",
                                                    "denoiser_out_weight", "denoiser_out_bias"]


def test_auto_policy_decision_and_refusal_remedy():
    report = deeppcr.explain(three_chains(), (torch.randn(2, 8),))  # policy="auto" on a CPU
    assert report.reasons() == [Reason.NOT_PROFITABLE] * 3
    c = report.chains[0]
    assert c.decision.startswith("kept sequential: not_profitable") and c.remedy == Reason.NOT_PROFITABLE.remedy
    assert c.cost["predicted_speedup"] < c.cost["margin"] and c.cost["device"] == "cpu"
    text = str(report)
    assert "not_profitable" in text and "remedy: " + Reason.NOT_PROFITABLE.remedy in text


@pytest.mark.parametrize("case,reason", [("short", Reason.TOO_SHORT), ("widths", Reason.SHAPES_DIFFER),
                                         ("dropout", Reason.RANDOMNESS), ("never", Reason.POLICY_NEVER)])
def test_refusals_are_typed_with_remedies(case, reason):
    torch.manual_seed(0)
    x = torch.randn(3, 8, dtype=torch.float64)
    options = {}
    if case == "short":
        model = Stack([Residual(8) for _ in range(4)]).double()
    elif case == "widths":
        widths = [8, 7, 6, 5, 4, 3]
        model = nn.Sequential(*[m for a, b in zip(widths, widths[1:]) for m in (nn.Linear(a, b), nn.Tanh())]).double()
    elif case == "dropout":
        model = nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(8, 8), nn.Dropout(0.3))]).double().train()
    else:
        model, options = Stack([Residual(8) for _ in range(8)]).double(), {"policy": "never"}
    report = _explain(model, (x,), **options)
    assert report.reasons() == [reason] and not report.rewritten
    rec = report.refused[0]
    assert rec.remedy == reason.remedy and rec.decision.startswith(f"kept sequential: {reason.value}")
    assert f"remedy: {reason.remedy}" in str(report)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["chains"][0]["reason"] == reason.value and data["chains"][0]["remedy"] == reason.remedy


def test_json_round_trip():
    model, inputs, _ = conditioning()
    for report in (_explain(model, inputs), deeppcr.explain(three_chains(), (torch.randn(2, 8),))):
        data = json.loads(json.dumps(report.to_dict()))
        back = deeppcr.CompileReport.from_dict(data)
        assert back == report and back.to_dict() == data
        assert isinstance(back.chains[0].inputs[0], deeppcr.InputRecord)
        assert list(back.graphs) == list(report.graphs) and all(g is None for g in back.graphs.values())
        assert str(back) == str(report)


def test_graph_history_per_pass():
    model = three_chains()
    compiled = deeppcr.compile(model, policy="always")
    x = torch.randn(2, 8)
    compiled(x)
    graphs = compiled.report.graphs
    assert list(graphs) == ["capture", "shape_prop", "find_chains", "validate", "decide", "describe", "rewrite"]
    assert all(isinstance(g, fx.GraphModule) for g in graphs.values())
    assert graphs["rewrite"] is compiled.graph_module and graphs["shape_prop"] is graphs["capture"]
    solves = lambda gm: [n for n in gm.graph.nodes  # noqa: E731
                         if n.op == "call_module" and isinstance(gm.get_submodule(n.target), deeppcr.PCRSolve)]
    assert solves(graphs["capture"]) == [] and len(solves(graphs["rewrite"])) == 3
    torch.testing.assert_close(graphs["capture"](x), model(x))  # the history is runnable, and unchanged
    assert compiled.report.captured == 1 and "captured=1" in str(compiled.report)


def test_emitted_code_is_readable():
    compiled = deeppcr.compile(three_chains(), policy="always")
    compiled(torch.randn(2, 8))
    code = compiled.graph_module.code
    assert "pcr_solve_0 = self.pcr_solve_0(x, encoder_a_weight_per_step, encoder_a_bias_per_step" in code
    assert "pcr_solve_0_out8 = pcr_solve_0[8]" in code and "stack_1" not in code
    compile(code, "<emitted>", "exec")
    solve = compiled.graph_module.pcr_solve_1
    assert "L=8, period=1, mode=full" in repr(solve) and "blocks.0" in repr(solve)
    fresh = deeppcr.compile(three_chains(), policy="always", example_inputs=(torch.randn(2, 8),))
    assert "mode=full" in repr(fresh.graph_module.pcr_solve_0)  # planned before the first solve
