"""Config.autotune: both variants timed on the real inputs, the faster kept, results and state unchanged.

Timing outcomes are forced by replacing ``autotune.time_variants``; no test asserts on real times.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn

import deeppcr_fx as deeppcr
from compile_zoo import ZOO
from deeppcr_fx.passes import autotune as at
from deeppcr_fx.passes import cost_model as cm
from deeppcr_fx.passes import decide
from deeppcr_fx.results import Reason


def timer(*outcomes):
    """A ``time_variants`` that returns ``outcomes`` in turn (seconds: sequential, parallel) and logs its calls."""
    calls = []

    def time_variants(sequential, parallel, args, backward):
        calls.append(backward)
        sequential(*args), parallel(*args)  # both variants run on the real inputs
        return outcomes[len(calls) - 1]

    time_variants.calls = calls
    return time_variants


def solves(compiled) -> list:
    gm = compiled.graph_module
    return [m for m in gm.modules() if isinstance(m, deeppcr.PCRSolve)] if gm is not None else []


def test_parallel_faster_is_kept_and_both_times_reported(monkeypatch):
    monkeypatch.setattr(at, "time_variants", timer((0.010, 0.002)))
    torch.manual_seed(0)
    model, inputs, _ = ZOO["mlp"]()
    compiled = deeppcr.compile(model, policy="always", autotune=True)
    torch.testing.assert_close(compiled(*inputs), model(*inputs), rtol=1e-9, atol=1e-9)
    (rec,) = compiled.report.chains
    assert rec.status == "rewritten" and len(solves(compiled)) == 1
    measured = rec.cost["measured"]
    assert (measured["sequential_ms"], measured["parallel_ms"], measured["backward"]) == (10.0, 2.0, True)
    assert measured["iterations"] >= 1 and rec.cost["sequential_ms"] > 0  # the prediction stays alongside
    assert rec.decision.startswith("rewritten (policy='always', autotune): autotune measured")
    text = str(compiled.report)
    assert "measured (autotune, whole model, forward + backward): sequential 10 ms vs parallel 2 ms (5.00x)" in text
    assert any(n.startswith("autotune: timed 1 chain") for n in compiled.report.notes)
    assert [s.iterations for c in compiled.stats() for s in c.solves] == [solves(compiled)[0].last_stats.iterations]


def test_sequential_faster_reverts_the_chain(monkeypatch):
    monkeypatch.setattr(at, "time_variants", timer((0.002, 0.010)))
    torch.manual_seed(0)
    model, inputs, _ = ZOO["mlp"]()
    compiled = deeppcr.compile(model, policy="always", autotune=True)
    torch.testing.assert_close(compiled(*inputs), model(*inputs), rtol=0, atol=0)  # the original model runs
    (rec,) = compiled.report.chains
    assert rec.status == "refused" and rec.reason is Reason.NOT_PROFITABLE and rec.submodule is None
    assert rec.detail.startswith("autotune measured whole model") and rec.cost["measured"]["parallel_ms"] == 10.0
    assert rec.decision.startswith("kept sequential: not_profitable: autotune measured")
    assert solves(compiled) == [] and "pcr_solve" not in compiled.graph_module.code
    assert "sequential 2 ms vs parallel 10 ms (0.20x)" in str(compiled.report)


def test_report_with_measurements_round_trips_through_json(monkeypatch):
    monkeypatch.setattr(at, "time_variants", timer((0.010, 0.002)))
    torch.manual_seed(0)
    model, inputs, _ = ZOO["mlp"]()
    compiled = deeppcr.compile(model, policy="always", autotune=True)
    compiled(*inputs)
    data = json.loads(json.dumps(compiled.report.to_dict()))
    back = deeppcr.CompileReport.from_dict(data)
    assert back == compiled.report and str(back) == str(compiled.report)
    assert back.chains[0].cost["measured"]["parallel_ms"] == 2.0


def test_each_chain_keeps_its_faster_variant(monkeypatch):
    tune = timer((0.001, 0.005), (0.005, 0.001))  # chain 0: sequential wins; chain 1: parallel wins
    monkeypatch.setattr(at, "time_variants", tune)
    torch.manual_seed(0)
    model, inputs, expected = ZOO["two_chains"]()
    compiled = deeppcr.compile(model, policy="always", autotune=True)
    torch.testing.assert_close(compiled(*inputs), model(*inputs), rtol=1e-9, atol=1e-9)
    first, second = compiled.report.chains
    assert (first.status, second.status) == ("refused", "rewritten") and len(tune.calls) == 2
    assert first.cost["measured"]["sequential_ms"] == 1.0 and second.cost["measured"]["parallel_ms"] == 1.0
    assert [s.length for s in solves(compiled)] == [expected[1][0]]
    assert list(compiled.report.graphs)[-1] == "rewrite" and compiled.report.graphs["rewrite"] is compiled.graph_module


def test_policy_never_does_not_tune(monkeypatch):
    tune = timer()
    monkeypatch.setattr(at, "time_variants", tune)
    torch.manual_seed(0)
    model, inputs, _ = ZOO["mlp"]()
    compiled = deeppcr.compile(model, policy="never", autotune=True)
    compiled(*inputs)
    assert tune.calls == [] and compiled.report.reasons() == [Reason.POLICY_NEVER]
    assert compiled.report.chains[0].cost["measured"] is None


def test_auto_times_only_chains_the_prediction_makes_plausible(monkeypatch):
    tune = timer((0.005, 0.001))
    monkeypatch.setattr(at, "time_variants", tune)
    torch.manual_seed(0)
    model, inputs, _ = ZOO["mlp"]()  # predicted far below TRY_FROM on a CPU: not timed
    compiled = deeppcr.compile(model, policy="auto", autotune=True)
    compiled(*inputs)
    assert tune.calls == [] and compiled.report.reasons() == [Reason.NOT_PROFITABLE]

    def plausible(shape, constants, iterations=None):  # between TRY_FROM and the margin
        return cm.Prediction(sequential_s=0.008, parallel_s=0.01, iterations=5, why_iterations="test",
                             sequential_finish=0, backward=shape.backward, mode=shape.mode, device="cpu")

    monkeypatch.setattr(decide, "predict", plausible)
    compiled = deeppcr.compile(model, policy="auto", autotune=True)
    torch.testing.assert_close(compiled(*inputs), model(*inputs), rtol=1e-9, atol=1e-9)
    (rec,) = compiled.report.chains
    assert len(tune.calls) == 1 and rec.status == "rewritten" and "autotune" in rec.decision
    assert rec.cost["predicted_speedup"] == 0.8 and rec.cost["measured"]["parallel_ms"] == 1.0


def test_forward_only_under_no_grad(monkeypatch):
    tune = timer((0.010, 0.002))
    monkeypatch.setattr(at, "time_variants", tune)
    torch.manual_seed(0)
    model, inputs, _ = ZOO["mlp"]()
    compiled = deeppcr.compile(model, policy="always", autotune=True)
    with torch.no_grad():
        compiled(*inputs)
    assert tune.calls == [False] and compiled.report.chains[0].cost["measured"]["backward"] is False


class Noisy(nn.Module):
    """A BatchNorm (train mode: updates running stats) and dropout around a tanh MLP chain."""

    def __init__(self, L=8, w=8):
        super().__init__()
        self.norm = nn.BatchNorm1d(w)
        self.layers = nn.ModuleList(nn.Linear(w, w) for _ in range(L))
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        x = self.norm(x)
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.drop(x)


@pytest.mark.parametrize("winner", ["sequential", "parallel", "measured"])
def test_tuning_leaves_results_grads_buffers_and_rng_alone(monkeypatch, winner):
    if winner != "measured":  # "measured": the real timer runs (its times are not asserted on)
        monkeypatch.setattr(at, "time_variants", timer((0.001, 0.002) if winner == "sequential" else (0.002, 0.001)))
    torch.manual_seed(0)
    model = Noisy().double().train()
    reference = copy.deepcopy(model)
    x = torch.randn(6, 8, dtype=torch.float64)
    for m in (model, reference):  # gradients accumulated by an earlier step must survive
        m.layers[0].weight.grad = torch.ones_like(m.layers[0].weight)
    compiled = deeppcr.compile(model, policy="always", autotune=True, min_length=2)
    torch.manual_seed(1)
    y, after = compiled(x), torch.rand(3)
    torch.manual_seed(1)
    y_ref, after_ref = reference(x), torch.rand(3)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)  # same dropout mask: the RNG was not consumed
    assert torch.equal(after, after_ref)
    torch.testing.assert_close(model.norm.running_mean, reference.norm.running_mean, rtol=0, atol=0)
    assert int(model.norm.num_batches_tracked) == int(reference.norm.num_batches_tracked) == 1
    assert torch.equal(model.layers[0].weight.grad, torch.ones_like(model.layers[0].weight))
    assert all(p.grad is None for p in model.layers[1].parameters())
    y.sum().backward()
    y_ref.sum().backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-7, atol=1e-9)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)  # Parameters untouched
    assert compiled.report.chains[0].cost["measured"] is not None
