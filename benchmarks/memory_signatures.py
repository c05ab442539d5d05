"""Memory across many input signatures: RSS after calling a compiled model with N batch sizes.

Each new batch size is a new input signature: a specialisation is built (trace, passes,
rewritten graph) and cached, up to ``Config.cache_limit`` (default 8); past it the original
model runs (one warning, a report note) and nothing more is kept. The same calls on the eager
model are the baseline. Usage::

    python benchmarks/memory_signatures.py [--L 512] [--width 32] [--sizes 40]

Prints RSS growth (MiB) for eager and compiled, and the number of specialisations kept.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import warnings

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import deeppcr_fx as deeppcr  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run(model: nn.Module, sizes: list, width: int) -> float:
    gc.collect()
    before = rss_mib()
    for b in sizes:
        x = torch.randn(b, width, requires_grad=True)
        model(x).sum().backward()
    gc.collect()
    return rss_mib() - before


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--L", type=int, default=512)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--sizes", type=int, default=40)
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(*[m for _ in range(a.L) for m in (nn.Linear(a.width, a.width), nn.Tanh())])
    sizes = list(range(1, a.sizes + 1))
    eager = run(model, sizes, a.width)
    compiled = deeppcr.compile(model, policy="always")
    limit = compiled.deeppcr_config.cache_limit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cached = run(compiled, sizes[:limit], a.width)
        past = run(compiled, sizes[limit:], a.width)  # past the cache limit: the original model runs
        again = run(compiled, sizes, a.width)  # every signature again: nothing new is kept
    print(f"L={a.L} width={a.width}, {a.sizes} batch sizes (forward + backward each), cache_limit={limit}")
    print(f"RSS growth, eager, all {a.sizes} sizes:            {eager:8.1f} MiB")
    print(f"RSS growth, compiled, first {limit} sizes (built):   {cached:8.1f} MiB "
          f"({compiled.specialisations} specialisations kept)")
    print(f"RSS growth, compiled, next {a.sizes - limit} sizes (past limit): {past:8.1f} MiB")
    print(f"RSS growth, compiled, all {a.sizes} sizes again:     {again:8.1f} MiB")


if __name__ == "__main__":
    main()
