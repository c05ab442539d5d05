"""The compiled solve (``backend="inductor"``, full mode) with and without this wave's two CPU kernels, in one
process, alternating, fresh input per call, medians (one intra-op thread, float32):

    before    the row loop with libm exp/tanh per element, cyclic reduction inside inductor's graph
    vecmath   + the row loop's transcendental ops vectorised over blocks of rows (runtime/vecmath.py)
    cscan     + cyclic reduction as one C++ kernel (runtime/cscan.py)

    python benchmarks/_kernels_perf.py --L 4096 16384 --w 2 4 --T 10000 --n 2 4 [--train]

Every variant is compiled for its own step object (its own cache entries) before the timed rounds; the
answers are checked against each other (max |diff| of the last state, or of the gradients with --train).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _peers_torch import INPUTS, Problem, gru_step, mlp_step  # noqa: E402

import deeppcr_fx as deeppcr  # noqa: E402
from deeppcr_fx.runtime import cscan, rowloop  # noqa: E402

VARIANTS = {"before": (False, False), "vecmath": (True, False), "cscan": (True, True)}


def run(kind: str, L: int, n: int, train: bool, rounds: int) -> None:
    prob = Problem(kind, L, n, 1)
    weights, shared = prob.weights()
    base = mlp_step if kind == "mlp" else gru_step
    config = deeppcr.Config(backend="inductor", jacobian="full")
    steps = {name: (lambda *a: base(*a)) for name in VARIANTS}  # its own cache entries per variant
    its = {name: [] for name in VARIANTS}

    def call(name, i):
        inp = prob.inputs[i]
        x0 = inp[0].clone().requires_grad_(train)
        ps = tuple(t.clone().requires_grad_(train) for t in weights + tuple(inp[1:]))
        sh = tuple(t.clone().requires_grad_(train) for t in shared)
        with torch.set_grad_enabled(train):
            res = deeppcr.solve(steps[name], x0, per_step=ps, shared=sh, config=config)
            its[name].append(res.stats.forward.iterations)
            if train:
                return torch.autograd.grad(res.states[-1].sum(), (x0, *ps, *sh))
        return (res.states[-1],)

    check = {}
    for name, (vector, cpp) in VARIANTS.items():  # compile each variant with its switches
        rowloop.VECTOR_MATH, cscan.ENABLED = vector, cpp
        check[name] = call(name, INPUTS)
    rowloop.VECTOR_MATH, cscan.ENABLED = True, True
    diff = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
               for name in VARIANTS for a, b in zip(check[name], check["before"]))
    for v in its.values():
        v.clear()
    times = {name: [] for name in VARIANTS}
    l0 = os.getloadavg()[0]
    for r in range(rounds):
        for name in (list(VARIANTS) if r % 2 == 0 else list(VARIANTS)[::-1]):
            t0 = time.perf_counter()
            call(name, r % INPUTS)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    label = f"MLP L={L} w={n}" if kind == "mlp" else f"GRU T={L} n={n}"
    cells = "  ".join(f"{k} {med[k]:.2f} ms ({statistics.median(its[k]):g} it)" for k in VARIANTS)
    print(f"{label} B=1 {'fwd+bwd' if train else 'fwd'}: {cells}  | before/cscan {med['before'] / med['cscan']:.2f}x"
          f"  vecmath/cscan {med['vecmath'] / med['cscan']:.2f}x  | max rel diff {diff:.1e}  "
          f"[load {l0:.1f}-{os.getloadavg()[0]:.1f}]", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    ap = argparse.ArgumentParser()
    ap.add_argument("--L", type=int, nargs="*", default=[4096])
    ap.add_argument("--w", type=int, nargs="+", default=[4])
    ap.add_argument("--T", type=int, nargs="*", default=[])
    ap.add_argument("--n", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--train", action="store_true")
    a = ap.parse_args()
    for kind, lengths, widths in (("mlp", a.L, a.w), ("gru", a.T, a.n)):
        for L in lengths:
            for n in widths:
                run(kind, L, n, a.train, a.rounds)
