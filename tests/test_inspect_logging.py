"""Logging: only through logging.getLogger(__name__) with lazy %-formatting; graphs are formatted only at DEBUG;
no print in library code (the command line and the demo excepted)."""
import ast
import logging
from pathlib import Path

import pytest
import torch
import torch.fx as fx

import deeppcr_fx as deeppcr
from inspect_models import ddim_sampler, three_chains

PACKAGE = Path(deeppcr.__file__).parent
LEVELS = {"debug", "info", "warning", "error", "exception", "critical", "log"}


@pytest.fixture
def formatting_calls(monkeypatch):
    """Count every way of turning a graph into text."""
    calls = []

    def counting(name, original):
        def wrapper(self, *args, **kwargs):
            calls.append(name)
            return original(self, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(fx.Graph, "__str__", counting("Graph.__str__", fx.Graph.__str__))
    monkeypatch.setattr(fx.Graph, "print_tabular", counting("Graph.print_tabular", fx.Graph.print_tabular))
    monkeypatch.setattr(fx.GraphModule, "print_readable",
                        counting("GraphModule.print_readable", fx.GraphModule.print_readable))
    monkeypatch.setattr(fx.GraphModule, "__str__", counting("GraphModule.__str__", fx.GraphModule.__str__))
    monkeypatch.setattr(fx.GraphModule, "code", property(counting("GraphModule.code", fx.GraphModule.code.fget)))
    return calls


@pytest.mark.parametrize("factory", [three_chains, ddim_sampler])
def test_no_graph_is_formatted_at_info(factory, formatting_calls, caplog):
    caplog.set_level(logging.INFO, logger="deeppcr_fx")
    compiled = deeppcr.compile(factory(), policy="always")
    compiled(torch.randn(2, 8))
    assert compiled.report.rewritten and formatting_calls == []


def test_graphs_are_logged_at_debug(formatting_calls, caplog):
    caplog.set_level(logging.DEBUG, logger="deeppcr_fx")
    compiled = deeppcr.compile(three_chains(), policy="always")
    compiled(torch.randn(2, 8))
    assert formatting_calls  # formatted now, because a handler emits DEBUG records
    text = caplog.text
    assert "captured graph (symbolic)" in text and "graph after rewrite" in text
    assert "pcr_solve_0 = self.pcr_solve_0(x, encoder_a_weight_per_step" in text


def _sources():
    return sorted(PACKAGE.rglob("*.py"))


def test_logger_calls_are_lazy():
    bad = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in LEVELS and isinstance(node.func.value, ast.Name)
                    and node.func.value.id in ("logger", "logging", "log")):
                continue
            if node.func.value.id == "logging":
                bad.append(f"{path.name}:{node.lineno} logs through the root logger")
            for arg in node.args:
                eager = isinstance(arg, ast.JoinedStr) or (isinstance(arg, ast.BinOp) and isinstance(arg.op, ast.Mod)) \
                    or (isinstance(arg, ast.Call) and isinstance(arg.func, ast.Attribute) and arg.func.attr == "format")
                if eager:
                    bad.append(f"{path.name}:{node.lineno} formats its message eagerly")
    assert bad == []


def test_loggers_are_per_module_and_no_print_in_the_library():
    bad = []
    for path in _sources():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "getLogger":
                if not (len(node.args) == 1 and isinstance(node.args[0], ast.Name) and node.args[0].id == "__name__"):
                    bad.append(f"{path.name}:{node.lineno} getLogger without __name__")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
                    "basicConfig", "setLevel", "addHandler"):
                bad.append(f"{path.name}:{node.lineno} configures logging")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print" \
                    and path.name not in ("__main__.py", "demo.py"):
                bad.append(f"{path.name}:{node.lineno} prints")
    assert bad == []
