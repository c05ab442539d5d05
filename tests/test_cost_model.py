"""The cost model behind policy="auto": sympy expressions, calibration cache, sanity, decisions, report."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import sympy
import torch

import deeppcr_fx as deeppcr
from compile_zoo import ZOO
from deeppcr_fx.passes import calibrate as cal
from deeppcr_fx.passes import cost_model as cm
from deeppcr_fx.passes import decide
from deeppcr_fx.passes.step_profile import ChainShape
from deeppcr_fx.results import Reason

# Fixed unit costs (a made-up CPU): the sanity checks below never depend on a measurement.
CONSTANTS = cal.DeviceConstants(
    device="cpu", threads=1, t_op=3e-6, t_module=2e-6, t_autograd=1e-5, t_stack=2e-7, bandwidth=1.6e10,
    batched={"forward": (7e-5, ((4, 1e-10), (16, 1e-10))), "vjp": (2.5e-4, ((4, 3e-9), (16, 3e-10))),
             "jacobian": (3e-4, ((4, 1e-8), (16, 3e-9)))},
    matmul=tuple((n, 1e-8 * n ** 2) for n in cal.SIZES), matvec=tuple((n, 2e-9 * n ** 2) for n in cal.SIZES))


def shape(**changes) -> ChainShape:
    base = ChainShape(length=4096, batch=1, width=4, ops=2, module_calls=1, flops=36.0, per_step_tensors=2,
                      grad_tensors=2, residual=False, mode="full", iteration_cap=64, itemsize=4, device_type="cpu",
                      backward=True)
    return dataclasses.replace(base, **changes)


def predict(**changes) -> cm.Prediction:
    return cm.predict(shape(**changes), CONSTANTS)


@pytest.mark.parametrize("mode", ["full", "diag", "identity", "zero"])
@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("backward", [False, True])
def test_expressions_are_sympy_in_the_documented_symbols(mode, chunked, backward):
    seq, par = cm.expressions(mode, chunked, backward)
    allowed = set(cm.SYMBOLS.values()) | set(cm.UNITS.values())
    for expr in (seq, par):
        assert isinstance(expr, sympy.Expr) and expr.free_symbols <= allowed
    assert cm.SYMBOLS["L"] in seq.free_symbols and cm.SYMBOLS["k"] in par.free_symbols
    work = cm.sequential_work(backward)
    assert isinstance(work.launches, sympy.Expr) and work.launches == cm.SYMBOLS["L"] * cm.SYMBOLS["q"]


def test_calibration_is_cached_per_device(monkeypatch):
    calls = []

    def fake(device):
        calls.append(device)
        return dataclasses.replace(CONSTANTS, device=str(device))

    monkeypatch.setattr(cal, "CACHE", cal.CalibrationCache())
    monkeypatch.setattr(cal, "measure", fake)
    first = cal.calibrate("cpu")
    assert cal.calibrate("cpu") is first and cal.calibrate(torch.device("cpu")) is first and len(calls) == 1
    assert cal.calibrate("cpu", refresh=True) is not first and len(calls) == 2
    assert list(cal.cached()) == [("cpu", torch.get_num_threads())]


def test_calibration_measures_positive_constants():
    c = cal.calibrate("cpu")  # measured once per process (later tests reuse it)
    assert c is cal.calibrate("cpu")
    for name in ("t_op", "t_module", "t_autograd", "t_stack", "bandwidth"):
        assert math.isfinite(getattr(c, name)) and getattr(c, name) >= 0
    assert all(c.op_time(k) > 0 and c.flop_time(k, 8) > 0 for k in cal.BATCHED_KINDS)
    assert [n for n, _ in c.matmul] == list(cal.SIZES) and c.product_time(128) > c.product_time(64) > 0
    json.dumps(c.to_dict())


def test_longer_chains_cost_more_and_pay_off_more():
    by_length = [predict(length=L) for L in (64, 256, 1024, 4096)]
    for short, long in zip(by_length, by_length[1:]):
        assert long.sequential_s > short.sequential_s and long.parallel_s > short.parallel_s
        assert long.speedup > short.speedup


def test_wider_states_more_samples_and_iterations_pay_off_less():
    assert predict(width=16).speedup < predict(width=4).speedup
    assert predict(width=64).speedup < predict(width=16).speedup
    assert predict(batch=16).speedup < predict(batch=1).speedup
    slow = cm.predict(shape(), CONSTANTS, iterations=20)
    assert slow.parallel_s > predict().parallel_s and slow.sequential_s == predict().sequential_s


def test_backward_and_skip_paths():
    fwd, train = predict(backward=False), predict()
    assert train.sequential_s > fwd.sequential_s and train.parallel_s > fwd.parallel_s
    assert (fwd.iterations, predict(residual=True).iterations) == (cm.ITERATIONS_CONTRACTIVE, cm.ITERATIONS_RESIDUAL)
    assert predict(residual=True).speedup < train.speedup


def test_linear_modes_expect_the_cap_and_a_sequential_finish():
    p = predict(mode="identity", width=128)
    assert p.iterations == 64 and p.sequential_finish == 4096 - 64 and "cap" in p.why_iterations
    assert predict(mode="identity", length=32, iteration_cap=32).sequential_finish == 0
    assert predict(iteration_cap=4).sequential_finish == 4096 - 4


def test_decision_uses_the_margin():
    p = predict()
    assert p.profitable(p.speedup) and not p.profitable(p.speedup * 1.01)
    assert p.profitable() == (p.speedup >= cm.MARGIN) and f"{cm.MARGIN}x" in p.describe()
    d = p.to_dict()
    assert d["margin"] == cm.MARGIN and d["sequential_ms"] > 0 and d["iterations"] == p.iterations
    json.dumps(d)


def test_auto_keeps_tiny_chains_sequential_on_cpu():
    torch.manual_seed(0)
    model, inputs, _ = ZOO["mlp"]()  # L = 12, w = 8, B = 3: far below any CPU pay-off
    compiled = deeppcr.compile(model, policy="auto")
    torch.testing.assert_close(compiled(*inputs), model(*inputs), rtol=0, atol=0)  # the original model ran
    (rec,) = compiled.report.chains
    assert rec.status == "refused" and rec.reason is Reason.NOT_PROFITABLE
    assert rec.decision.startswith("kept sequential: not_profitable: predicted forward + backward speed-up")
    cost = rec.cost
    assert cost["device"] == "cpu" and cost["backward"] and cost["predicted_speedup"] < cost["margin"] == cm.MARGIN
    assert cost["sequential_ms"] > 0 and cost["parallel_ms"] > cost["sequential_ms"] and cost["measured"] is None
    text = str(compiled.report)
    assert "cost: predicted forward + backward" in text and f"rewrites at >= {cm.MARGIN}x" in text


def test_prediction_follows_the_grad_mode():
    torch.manual_seed(0)
    model, inputs, _ = ZOO["mlp"]()
    with torch.no_grad():
        rec = deeppcr.explain(model, inputs).chains[0]
    assert rec.cost["backward"] is False and "predicted forward speed-up" in rec.decision


def test_auto_rewrites_where_the_prediction_clears_the_margin(monkeypatch):
    def winning(shape, constants, iterations=None):
        return cm.Prediction(sequential_s=0.01, parallel_s=0.002, iterations=5, why_iterations="test",
                             sequential_finish=0, backward=shape.backward, mode=shape.mode, device="cpu")

    monkeypatch.setattr(decide, "predict", winning)
    torch.manual_seed(0)
    model, inputs, expected = ZOO["mlp"]()
    compiled = deeppcr.compile(model, policy="auto")
    torch.testing.assert_close(compiled(*inputs), model(*inputs), rtol=1e-9, atol=1e-9)
    (rec,) = compiled.report.chains
    assert rec.status == "rewritten" and rec.decision.startswith("rewritten (policy='auto'): predicted")
    assert rec.cost["predicted_speedup"] == 5.0 and "5.00x >= 1.3x" in rec.decision


def test_report_with_prediction_round_trips_through_json():
    torch.manual_seed(0)
    model, inputs, _ = ZOO["two_chains"]()
    report = deeppcr.explain(model, inputs, policy="always")
    data = json.loads(json.dumps(report.to_dict()))
    back = deeppcr.CompileReport.from_dict(data)
    assert back == report and str(back) == str(report)
    assert all(c.cost["parallel_ms"] > 0 for c in back.chains)


def test_profile_follows_the_runtimes_fast_paths(monkeypatch):
    shapes = []
    real = decide.predict
    monkeypatch.setattr(decide, "predict", lambda shape, constants: shapes.append(shape) or real(shape, constants))
    torch.manual_seed(0)
    model, inputs, _ = ZOO["mlp"]()  # B = 3, w = 8: a replicated batch of 24, trained Parameters
    deeppcr.explain(model, inputs)
    deeppcr.explain(model, inputs, flat_params=False)  # autograd stacks the Parameters: one leaf each
    model, inputs, _ = ZOO["conditioning"]()  # every step reads a (B, c) input: no replicated batch
    deeppcr.explain(model, inputs)
    assert [(s.replicated, s.direct_grads) for s in shapes] == [(True, True), (True, False), (False, True)]
