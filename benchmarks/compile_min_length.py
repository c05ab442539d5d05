"""Reproduce the measurement behind ``Config.min_length`` and ``policy="auto"`` (passes/cost_model.py).

For chains of the test zoo at L = 2..64 (float32), compile with policy="always", run once,
and print Newton iterations k, the depth model k * (ceil(log2 L) + 1) against the
sequential depth L, and wall times of the sequential model and the compiled one.

    python benchmarks/compile_min_length.py
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import deeppcr_fx as deeppcr  # noqa: E402
from compile_zoo import mlp, residual, transformer  # noqa: E402


def _time(fn, *args, repeat=5) -> float:
    fn(*args)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn(*args)
    return (time.perf_counter() - t0) / repeat


def main() -> None:
    print(f"{'chain':12s} {'L':>4s} {'k':>3s} {'par.depth':>9s} {'seq.depth':>9s} {'t_seq ms':>9s} {'t_pcr ms':>9s}")
    for name, build in (("residual", residual), ("mlp", mlp), ("transformer", transformer)):
        for L in (2, 4, 8, 16, 32, 64):
            torch.manual_seed(0)
            model, inputs, _ = build(L=L, dtype=torch.float32)
            compiled = deeppcr.compile(model, policy="always", min_length=1)
            with torch.no_grad():
                compiled(*inputs)
                solve = next(m for m in compiled.graph_module.modules() if isinstance(m, deeppcr.PCRSolve))
                k = solve.last_stats.iterations
                t_seq, t_pcr = _time(model, *inputs), _time(compiled, *inputs)
            depth = k * (math.ceil(math.log2(L)) + 1)
            print(f"{name:12s} {L:4d} {k:3d} {depth:9d} {L:9d} {t_seq * 1e3:9.2f} {t_pcr * 1e3:9.2f}")


if __name__ == "__main__":
    main()
