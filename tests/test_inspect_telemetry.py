"""Solver telemetry: compiled.stats() per chain, reset_stats(), record_stats=False, the convergence plot
and the optional progress bar."""
import sys

import pytest
import torch

import deeppcr_fx as deeppcr
from deeppcr_fx import FinishCause
from inspect_models import three_chains


def _compiled(**options):
    compiled = deeppcr.compile(three_chains(), policy="always", **options)
    return compiled, torch.randn(2, 8)


def test_stats_per_chain_and_reset():
    compiled, x = _compiled()
    assert compiled.stats() == []
    compiled(x)
    compiled(x)
    stats = compiled.stats()
    assert [(s.chain, s.submodule, s.length) for s in stats] == [(0, "pcr_solve_0", 9), (1, "pcr_solve_1", 8),
                                                                  (2, "pcr_solve_2", 10)]
    for s in stats:
        assert len(s.solves) == 2 and s.signature == "float32[2, 8]@cpu"
        for solve, residuals in zip(s.solves, s.residuals):
            assert solve.iterations == len(residuals) == len(solve.forward.window_starts) >= 1
            assert residuals[-1] <= 1 and solve.converged
        assert s.sequential_finishes == [None, None]
    assert stats[0].covers[0] == "encoder.0" and "encoder.0 .. encoder.8" in str(stats[0])
    assert stats[0].to_dict()["solves"][0]["forward"]["residuals"] == stats[0].residuals[0]
    compiled(torch.randn(3, 8))  # a second signature: its chains are listed after the first's
    assert [len(s.solves) for s in compiled.stats()] == [2, 2, 2, 1, 1, 1]
    compiled.reset_stats()
    assert all(s.solves == [] for s in compiled.stats())
    assert compiled.graph_module.pcr_solve_0.last_stats is None


def test_sequential_finish_is_recorded_with_its_cause():
    compiled, x = _compiled(max_iter=1)
    compiled(x)
    finishes = [f for s in compiled.stats() for f in s.sequential_finishes]
    assert finishes and all(f is not None and f[1] is FinishCause.MAX_ITER for f in finishes)


def test_record_stats_off_keeps_nothing():
    compiled, x = _compiled(record_stats=False)
    compiled(x)
    assert all(s.solves == [] for s in compiled.stats())
    last = compiled.graph_module.pcr_solve_0.last_stats
    assert last.iterations >= 1 and last.residuals == [] and last.forward.window_starts == []


def test_plot_convergence(tmp_path):
    pytest.importorskip("matplotlib")
    compiled, x = _compiled()
    compiled(x)
    out = deeppcr.plot_convergence(compiled.stats(), tmp_path / "conv.png")
    assert (tmp_path / "conv.png").stat().st_size > 1000 and out.endswith("conv.png")
    deeppcr.plot_convergence(compiled.graph_module.pcr_solve_0.last_stats, tmp_path / "one.svg")
    compiled.reset_stats()
    with pytest.raises(ValueError, match="no residuals recorded"):
        deeppcr.plot_convergence(compiled, tmp_path / "empty.png")


def test_plot_convergence_without_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(deeppcr.MissingDependency, match=r"deeppcr_fx\[plot\]"):
        deeppcr.plot_convergence([], tmp_path / "conv.png")


def test_progress_bar(capsys):
    pytest.importorskip("tqdm")
    compiled, x = _compiled(progress=True)
    torch.testing.assert_close(compiled(x), compiled.original(x), rtol=1e-4, atol=1e-5)
    err = capsys.readouterr().err
    assert "deeppcr encoder.0 .. encoder.8" in err and "step" in err


def test_progress_without_tqdm(monkeypatch):
    compiled, x = _compiled(progress=True)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with pytest.raises(deeppcr.MissingDependency, match=r"deeppcr_fx\[progress\]"):
        compiled(x)


def test_progress_off_by_default():
    assert deeppcr.Config().progress is False and "progress" in deeppcr.Config.__doc__
