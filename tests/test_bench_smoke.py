"""The benchmark suite's code runs (no timing is asserted: speed is measured in benchmarks/, not in tests)."""
import importlib.util
import sys
from pathlib import Path

import torch

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "suite.py"


def _suite():
    spec = importlib.util.spec_from_file_location("bench_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_measure_row_has_every_variant_and_exact_outputs():
    suite = _suite()
    torch.manual_seed(0)
    case = suite.Case("paper", "tanh-mlp", suite.TanhMLP(12, 3), torch.randn(2, 3), ("forward", "train"),
                      dict(L=12, w=3, B=2))
    rows = suite.measure(case, "cpu", repeats=1)
    assert [r["mode"] for r in rows] == ["forward", "train"]
    for row in rows:
        for key in ("eager_ms", "always_ms", "always_speedup", "cold_ms", "auto_ms", "auto_speedup",
                    "always_iterations", "cold_iterations", "repeats"):
            assert key in row
        assert row["always_max_err"] < 1e-5 and row["cold_max_err"] < 1e-5 and row["auto_max_err"] < 1e-5
        assert int(row["cold_iterations"]) >= 1 and row["always_iterations"]
    suite.print_table(rows)
