"""CompileReport: data first (to_dict is JSON), a readable table second."""
import json

import torch
import torch.nn as nn

import deeppcr_fx as deeppcr
from compile_zoo import Residual, Stack


def _mixed_model():
    torch.manual_seed(0)
    short = [Residual(8) for _ in range(3)]
    good = [Residual(8) for _ in range(8)]
    return Stack(short + [nn.LayerNorm(8)] + good).double()


def test_report_records_found_rewritten_refused():
    model = _mixed_model()
    compiled = deeppcr.compile(model, policy="always")
    compiled(torch.randn(2, 8, dtype=torch.float64))
    report = compiled.report
    assert isinstance(report, deeppcr.CompileReport)
    assert [(c.length, c.status) for c in report.found] == [(3, "refused"), (8, "rewritten")]
    refused = report.refused[0]
    assert refused.reason is deeppcr.Reason.TOO_SHORT and "min_length=8" in refused.detail
    rewritten = report.rewritten[0]
    assert rewritten.covers == tuple(f"blocks.{i}" for i in range(4, 12))
    assert rewritten.jacobian == "full" and rewritten.state_shape == (2, 8) and rewritten.dtype == "float64"
    assert rewritten.n_per_step == 4 and rewritten.submodule == "pcr_solve_0"


def test_to_dict_is_json_and_str_is_a_table():
    model = _mixed_model()
    report = deeppcr.explain(model, (torch.randn(2, 8, dtype=torch.float64),), policy="always")
    data = json.loads(json.dumps(report.to_dict()))
    assert data["front_end"] == "symbolic" and data["policy"] == "always"
    assert [c["reason"] for c in data["chains"]] == ["too_short", None]
    assert data["chains"][0]["remedy"] == deeppcr.Reason.TOO_SHORT.remedy
    text = str(report)
    assert "2 found, 1 rewritten, 1 refused" in text
    assert "too_short" in text and "remedy:" in text and "blocks.4" in text


def test_every_reason_has_a_remedy():
    for reason in deeppcr.Reason:
        assert reason.remedy and reason.value == reason.name.lower()


def test_pcr_solve_repr_and_stats():
    model = _mixed_model()
    compiled = deeppcr.compile(model, policy="always")
    compiled(torch.randn(2, 8, dtype=torch.float64))
    solve = compiled.graph_module.get_submodule("pcr_solve_0")
    assert isinstance(solve, deeppcr.PCRSolve)
    assert solve.last_stats.length == 8 and solve.last_stats.converged
    assert "L=8" in repr(solve) and "blocks.4" in repr(solve)
