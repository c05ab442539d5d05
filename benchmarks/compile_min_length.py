"""Reproduce the measurement behind ``Config.min_length`` and ``policy="auto"`` (passes/cost_model.py).

For chains of the test zoo at L = 2..64 (float32), compile with policy="always" and print the
Newton iterations k of a cold solve (from the input: what the cost model assumes), the depth
model k * (ceil(log2 L) + 1) against the sequential depth L, and wall times of the sequential
model, the compiled one (warm starts: each solve starts from the previous call's solution) and
the compiled one with ``warm_start=False`` (cold). Times are medians of interleaved calls, each on
a fresh random input (drawn untimed), so a warm start never meets the solution of its own input.

    python benchmarks/compile_min_length.py
"""
from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import deeppcr_fx as deeppcr  # noqa: E402
from compile_zoo import mlp, residual, transformer  # noqa: E402


def _fresh(inputs: tuple) -> tuple:
    return tuple(torch.randn_like(x) if torch.is_floating_point(x) else x for x in inputs)


def _medians(fns: dict, inputs: tuple, repeat: int = 7) -> dict:
    """Median seconds per variant: the variants in turn, each call on a fresh input (drawn untimed)."""
    times = {name: [] for name in fns}
    for name, fn in fns.items():  # one untimed call each (first-call costs)
        fn(*_fresh(inputs))
    for _ in range(repeat):
        for name, fn in fns.items():
            args = _fresh(inputs)
            t0 = time.perf_counter()
            fn(*args)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    print(f"{'chain':12s} {'L':>4s} {'k':>3s} {'par.depth':>9s} {'seq.depth':>9s} {'t_seq ms':>9s} {'t_pcr ms':>9s} "
          f"{'t_cold ms':>9s}")
    for name, build in (("residual", residual), ("mlp", mlp), ("transformer", transformer)):
        for L in (2, 4, 8, 16, 32, 64):
            torch.manual_seed(0)
            model, inputs, _ = build(L=L, dtype=torch.float32)
            compiled = deeppcr.compile(model, policy="always", min_length=1)
            cold = deeppcr.compile(model, policy="always", min_length=1, warm_start=False)
            with torch.no_grad():
                t = _medians({"seq": model, "pcr": compiled, "cold": cold}, inputs)
                solve = next(m for m in cold.graph_module.modules() if isinstance(m, deeppcr.PCRSolve))
                k = solve.last_stats.iterations
            depth = k * (math.ceil(math.log2(L)) + 1)
            print(f"{name:12s} {L:4d} {k:3d} {depth:9d} {L:9d} {t['seq'] * 1e3:9.2f} {t['pcr'] * 1e3:9.2f} "
                  f"{t['cold'] * 1e3:9.2f}", flush=True)


if __name__ == "__main__":
    main()
