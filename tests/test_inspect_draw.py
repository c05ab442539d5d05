"""deeppcr.draw: before/after graphs through torch.fx's FxGraphDrawer (pydot optional, Graphviz optional)."""
import shutil
import sys
from pathlib import Path

import pytest
import torch

import deeppcr_fx as deeppcr
from inspect_models import three_chains


@pytest.fixture(scope="module")
def compiled():
    compiled = deeppcr.compile(three_chains(), policy="always")
    compiled(torch.randn(2, 8))
    return compiled


def test_draw_dot_before_and_after(compiled, tmp_path):
    pytest.importorskip("pydot")
    path = deeppcr.draw(compiled, tmp_path / "graph.dot")
    text = Path(path).read_text()
    before, after = text.split("subgraph cluster_after")
    assert "subgraph cluster_before" in before and "label=before" in before and "label=after" in after
    solve = next(line for line in after.splitlines() if line.startswith("after_pcr_solve_0 "))
    assert "PCRSolve" in solve and "L=9, period=1, mode=full" in solve and "encoder.0 .. encoder.8" in solve
    assert "before_tanh " in before and "pcr_solve" not in before
    assert "after_x -> after_pcr_solve_0;" in after
    deeppcr.draw(compiled.report, tmp_path / "from_report.dot")  # a report carries its graphs too
    deeppcr.draw(compiled.graph_module, tmp_path / "one.gv")


@pytest.mark.skipif(shutil.which("dot") is None, reason="the Graphviz 'dot' program is not installed")
def test_draw_svg(compiled, tmp_path):
    pytest.importorskip("pydot")
    deeppcr.draw(compiled, tmp_path / "graph.svg")
    assert "<svg" in (tmp_path / "graph.svg").read_text()


def test_draw_says_what_to_install(compiled, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pydot", None)
    with pytest.raises(deeppcr.MissingDependency, match=r"pip install pydot \(or pip install 'deeppcr_fx\[viz\]'\)"):
        deeppcr.draw(compiled, tmp_path / "graph.svg")


def test_draw_without_graphviz(compiled, tmp_path, monkeypatch):
    pytest.importorskip("pydot")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(deeppcr.MissingDependency, match="Graphviz 'dot' program"):
        deeppcr.draw(compiled, tmp_path / "graph.svg")


def test_draw_bad_input(tmp_path):
    with pytest.raises(ValueError, match="use one of"):
        deeppcr.draw(None, tmp_path / "graph.txt")
    pytest.importorskip("pydot")
    with pytest.raises(ValueError, match="call the compiled module"):
        deeppcr.draw(deeppcr.compile(three_chains()), tmp_path / "graph.dot")
    report = deeppcr.explain(three_chains(), (torch.randn(2, 8),))
    with pytest.raises(ValueError, match="read back from a dict"):
        deeppcr.draw(deeppcr.CompileReport.from_dict(report.to_dict()), tmp_path / "graph.dot")
