"""``policy="auto"``: rewrite a chain only where it is predicted to be faster (a documented heuristic).

Until the benchmark issue lands a measured cost model, the prediction compares *depths*:
a sequential chain is L steps deep; a parallel solve is about ``k * (ceil(log2 L) + 1)``
deep (k Newton iterations, each one batched step evaluation plus a PCR scan of
ceil(log2 L) rounds). The iteration count was measured on the test zoo (float32,
``jacobian="auto"``, ``deeppcr.compile(..., policy="always", min_length=1)``, reading
``PCRSolve.last_stats.iterations``; ``benchmarks/compile_min_length.py`` reproduces it):

    chain          L=4  L=8  L=16  L=32  L=64
    residual         4    4     4     5     5
    mlp (tanh)       4    5     5     5     5
    transformer      4    5     6     6     7

With k = 5 the parallel depth first drops below L at L = 32 (5 * 6 = 30 < 32), so "auto"
rewrites chains from L = 32 on. Depth only pays where steps really run in parallel: on
a CPU (2 cores here) every measured parallel solve was 10-100x slower than the
sequential loop, so "auto" keeps CPU chains sequential.

``Config.min_length`` (default 8) is a hard floor for every policy, "always" included:
the measured k was >= 4 at every length, so below 8 steps the parallel depth
(>= 4 * 4 = 16 at L = 8, 12 at L = 4) is always larger than the sequential one. The
table suggests raising the default to 32 once the benchmark issue confirms it on GPUs.
"""
from __future__ import annotations

import math

NEWTON_ITERATIONS = 5  # typical k measured above
ACCELERATORS = ("cuda", "xpu", "mps")


def parallel_depth(length: int, iterations: int = NEWTON_ITERATIONS) -> int:
    return iterations * (math.ceil(math.log2(max(length, 1))) + 1)


def predicted_speedup(length: int, device_type: str) -> float:
    """Sequential depth over parallel depth; 0 on a CPU, where parallel depth does not pay."""
    if device_type not in ACCELERATORS:
        return 0.0
    return length / parallel_depth(length)


def profitable(length: int, device_type: str) -> tuple[bool, str]:
    """Whether ``policy="auto"`` rewrites a chain of ``length`` steps, and why (for the report)."""
    if device_type not in ACCELERATORS:
        return False, f"inputs are on the {device_type}: parallel depth does not pay there"
    depth = parallel_depth(length)
    if depth >= length:
        return False, f"predicted parallel depth {depth} >= sequential depth {length}"
    return True, f"predicted parallel depth {depth} < sequential depth {length}"
