"""The package's structure, and one check per rule that used to live in two places.

- Layers: ``results``/``config`` <- ``runtime`` <- ``inspect`` <- ``passes`` <- ``api``. The runtime
  imports neither the compiler nor the inspection tools; inspection does not import the compiler.
- No module over 400 lines.
- Jacobian modes are objects (``runtime/modes.py``): no other module compares a mode's name.
- Rules with one home: the Jacobian mode the report shows is the one the solver uses (``Config.batch``
  included); the step template ``validate`` checked is the one the rewritten chain runs; float slots are
  numbered by one traversal (``find_chains.map_args``) for the finder and the template alike.
"""
import ast
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import deeppcr_fx as deeppcr
from deeppcr_fx.config import JACOBIAN_MODES
from deeppcr_fx.passes.plan import plans_of
from deeppcr_fx.runtime import modes

PACKAGE = Path(deeppcr.__file__).parent
# what each layer may import from the package (by top-level name under deeppcr_fx)
ALLOWED = {
    "results": set(),
    "config": {"results"},
    "_optional": {"results"},
    "runtime": {"results", "config", "_optional"},
    "inspect": {"results", "config", "_optional", "runtime"},
    "passes": {"results", "config", "_optional", "runtime", "inspect"},
}


def _layer(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported_layers(path: Path) -> set:
    """Top-level package names a module imports, lazily or not (relative and absolute imports)."""
    tree = ast.parse(path.read_text())
    depth = len(path.relative_to(PACKAGE).parts) - 1  # 0: a top-level module, 1: inside a subpackage
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] == "deeppcr_fx" and len(parts) > 1:
                    found.add(parts[1])
                continue
            up = node.level - 1  # how many packages above this module's own
            if up > depth:
                continue
            if up == depth:  # relative to the package root
                names = [(node.module or "").split(".")[0]] if node.module else [a.name for a in node.names]
                found.update(n for n in names if n)
            else:  # inside this module's own subpackage
                found.add(_layer(path))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "deeppcr_fx" and len(parts) > 1:
                    found.add(parts[1])
    return found


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_layers_import_only_downwards(path):
    layer = _layer(path)
    if layer not in ALLOWED:
        return  # api, demo, __main__, __init__: the top
    imported = _imported_layers(path) - {layer}
    assert imported <= ALLOWED[layer], f"{path.relative_to(PACKAGE)} ({layer}) imports {sorted(imported - ALLOWED[layer])}"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_over_400_lines(path):
    assert len(path.read_text().splitlines()) <= 400


# where mode names may be spelled out: the registry, and Config's validation of the public string
_MODE_NAMES_ALLOWED = {"runtime/modes.py", "config.py"}


def _mode_names(node: ast.AST) -> list:
    """The Jacobian mode names a string literal, or a tuple/list/set/dict literal of them, spells out."""
    if isinstance(node, ast.Constant):
        return [node.value] if node.value in modes.NAMES else []
    items = node.keys if isinstance(node, ast.Dict) else getattr(node, "elts", ()) \
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else ()
    return [k.value for k in items if isinstance(k, ast.Constant) and k.value in modes.NAMES]


def _mode_name_dispatch(tree: ast.AST) -> list:
    """``mode == "full"``, ``mode in ("diag", ...)``, ``case "zero":``, and tables of several mode names."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            if any(_mode_names(x) for x in (node.left, *node.comparators)):
                found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.MatchValue) and _mode_names(node.value):
            found.append((node.lineno, f"case {ast.unparse(node.value)}"))
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)) and len(_mode_names(node)) >= 2:
            found.append((node.lineno, ast.unparse(node)))
    return found


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_the_modes_module_dispatches_on_mode_names(path):
    """A mode's behaviour is a method or property of its object (``modes.mode_of(name)``), not a branch
    on its name elsewhere."""
    if str(path.relative_to(PACKAGE)) in _MODE_NAMES_ALLOWED:
        return
    found = _mode_name_dispatch(ast.parse(path.read_text()))
    assert not found, f"{path.relative_to(PACKAGE)} dispatches on Jacobian mode names: {found}"


def test_the_mode_check_sees_comparisons():
    tree = ast.parse('if mode == "full" or m.kind in ("diag", "x"): pass\n'
                     'T = ("identity", "zero")\n'
                     'Z = ("zeros", "full")')
    assert sorted(line for line, _ in _mode_name_dispatch(tree)) == [1, 1, 2]  # not line 3: one name, no compare


def test_config_names_the_registered_modes():
    assert JACOBIAN_MODES == ("auto", *modes.NAMES)
    assert all(modes.mode_of(name).name == name for name in modes.NAMES)
    assert modes.mode_of(modes.DIAG) is modes.DIAG
    with pytest.raises(deeppcr.InvalidInput, match="unknown Jacobian mode 'auto'"):
        modes.mode_of("auto")  # resolved by choose_mode first


def _tanh_mlp(depth=12, width=4):
    return nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(width, width), nn.Tanh())])


@pytest.mark.parametrize("batch", [None, True, False])
def test_report_mode_is_the_solvers_mode(batch):
    """(16, 8) states: per sample n = 8 (full); batch=False makes one sample of 128 elements (identity)."""
    torch.manual_seed(0)
    model = _tanh_mlp(width=8)
    compiled = deeppcr.compile(model, policy="always", batch=batch)
    x = torch.randn(16, 8)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    (record,) = compiled.report.chains
    solve = compiled.graph_module.get_submodule(record.submodule)
    assert record.jacobian == solve.last_stats.jacobian == ("identity" if batch is False else "full")


def test_rewrite_runs_the_template_validate_checked():
    compiled = deeppcr.compile(_tanh_mlp(), policy="always")
    compiled(torch.randn(2, 4))
    gm = compiled.graph_module
    (plan,) = plans_of(gm)
    assert plan.template is not None and gm.get_submodule(plan.submodule).step is plan.template.graph_module


class _Coefficients(nn.Module):
    """Per-step Python floats in positional args, keyword args and a nested tuple."""

    def __init__(self, depth=10, width=4):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.scales = [0.5 + 0.05 * i for i in range(depth)]
        self.bounds = [(-1.0 - 0.1 * i, 1.0 + 0.2 * i) for i in range(depth)]

    def forward(self, x):
        for layer, s, (lo, hi) in zip(self.layers, self.scales, self.bounds):
            x = torch.clamp(torch.tanh(layer(x)) * s, min=lo, max=hi) + torch.mul(x, 0.25)
        return x


def test_float_slots_are_numbered_once():
    torch.manual_seed(0)
    model = _Coefficients()
    compiled = deeppcr.compile(model, policy="always")
    x = torch.randn(3, 4, requires_grad=True)
    out = compiled(x)
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-6)
    (record,) = compiled.report.chains
    assert record.status == "rewritten"
    coefficients = [i for i in record.inputs if i.kind == "coefficient"]
    first, last = [model.scales[0], *model.bounds[0]], [model.scales[-1], *model.bounds[-1]]
    assert [(c.first, c.last) for c in coefficients] == [(repr(a), repr(b)) for a, b in zip(first, last)]
    (plan,) = plans_of(compiled.graph_module)
    placeholders = [n.name for n in plan.template.graph_module.graph.nodes if n.op == "placeholder"]
    assert sum(name.startswith("coef_") for name in placeholders) == 3
