"""What ``deeppcr.compile`` costs per call when it rewrites nothing (``policy="auto"`` keeping a
model sequential runs the user's own model behind a signature lookup).

    python benchmarks/wrapper_overhead.py [--L 64 256 1024] [--w 4] [--number 200]

For each depth it times, interleaved, the eager model and its compiled wrapper (no chain
rewritten: ``policy="never"``), plus what the wrapper checks before it dispatches a call (the
``guards``: the hook epoch, ``passes/hooks.py``, and the input signature with its train/eval
flags), under ``no_grad`` with one thread; best of several repeats of ``--number`` calls, as
``timeit``. The calls cycle through ``INPUTS`` distinct random inputs of one shape (made before
timing; every variant pays the same ``next()``), so no call repeats the input of the call before
it (nothing here is warm-started: no chain is rewritten).
"""
from __future__ import annotations

import argparse
import itertools
import sys
import timeit
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deeppcr_fx as deeppcr  # noqa: E402
from deeppcr_fx.signature import signature  # noqa: E402
from deeppcr_fx.passes.hooks import hook_epoch  # noqa: E402
from suite import TanhMLP  # noqa: E402


INPUTS = 16


def measure(L: int, w: int, number: int, rounds: int = 9) -> dict:
    torch.manual_seed(0)
    model, xs = TanhMLP(L, w), itertools.cycle([torch.randn(1, w) for _ in range(INPUTS)])
    compiled = deeppcr.compile(model, policy="never")
    def guards():  # what CompiledModule.forward checks on every call before it dispatches
        return hook_epoch() != compiled._hook_epoch, compiled._specialisations.get(
            signature((next(xs),), compiled._flag_modules))

    calls = {"eager": lambda: model(next(xs)), "compiled": lambda: compiled(next(xs)), "guards": guards}
    best = {name: float("inf") for name in calls}
    with torch.no_grad():
        compiled(next(xs))
        for _ in range(rounds):  # interleaved: a slow spell of the host hits every variant alike
            for name, fn in calls.items():
                best[name] = min(best[name], timeit.timeit(fn, number=number) / number)
    return dict(L=L, w=w, modules=len(list(model.modules())), **{f"{k}_us": 1e6 * v for k, v in best.items()})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--L", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--w", type=int, default=4)
    ap.add_argument("--number", type=int, default=200)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"{'L':>5} {'modules':>8} {'eager us':>10} {'compiled us':>12} {'overhead us':>12} {'guards us':>10}")
    for L in args.L:
        r = measure(L, args.w, max(1, args.number * 64 // L))
        print(f"{r['L']:>5} {r['modules']:>8} {r['eager_us']:>10.1f} {r['compiled_us']:>12.1f} "
              f"{r['compiled_us'] - r['eager_us']:>12.1f} {r['guards_us']:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
