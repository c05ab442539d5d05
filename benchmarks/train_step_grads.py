"""The training step with the default (exact for every way of asking for gradients) and with
``plain_backward_only=True`` (Parameters out of the autograd graph), against eager.

Tanh MLP, B = 1, Adam step between timed steps (untimed), a fresh input per step, one thread;
alternating rounds, medians of per-round ratios. Usage::

    python benchmarks/train_step_grads.py [--L 4096] [--w 4] [--rounds 7]
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import deeppcr_fx as deeppcr  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--L", type=int, default=4096)
    ap.add_argument("--w", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(a.L) for m in (nn.Linear(a.w, a.w), nn.Tanh())])
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    variants = {"eager": model,
                "default": deeppcr.compile(model, policy="always"),
                "plain_backward_only": deeppcr.compile(model, policy="always", plain_backward_only=True)}

    def step(fn) -> float:
        x = torch.randn(1, a.w)
        start = time.perf_counter()
        fn(x).square().sum().backward()
        elapsed = time.perf_counter() - start
        opt.step()
        opt.zero_grad(set_to_none=True)
        return elapsed

    for fn in variants.values():  # first calls: trace, compile, warm up
        step(fn), step(fn)
    gc.disable()
    times = {k: [] for k in variants}
    for r in range(a.rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for k in order:
            times[k].append(min(step(variants[k]) for _ in range(2)))
    gc.enable()
    eager = times["eager"]
    print(f"tanh MLP L={a.L} w={a.w} B=1, training step (forward + backward; Adam step untimed), {a.rounds} rounds")
    for k, ts in times.items():
        ratio = statistics.median(e / t for e, t in zip(eager, ts))
        print(f"  {k:>20}: {statistics.median(ts) * 1e3:8.1f} ms   {ratio:5.2f}x eager")


if __name__ == "__main__":
    main()
