"""What ``deeppcr.compile`` costs per call when it rewrites nothing (``policy="auto"`` keeping a
model sequential runs the user's own model behind a signature lookup).

    python benchmarks/wrapper_overhead.py [--L 64 256 1024] [--w 4] [--number 200] [--model tanh reading]

For each depth it times, interleaved, the eager model and its compiled wrapper (no chain
rewritten: ``policy="never"``), plus what the wrapper checks before it dispatches a call (the
``guards``: the hook epoch, ``passes/hooks.py``, the input signature with its train/eval
flags, and the Python values the trace read, ``passes/reads.py``), under ``no_grad`` with one thread; best of several repeats of ``--number`` calls, as
``timeit``. The calls cycle through ``INPUTS`` distinct random inputs of one shape (made before
timing; every variant pays the same ``next()``), so no call repeats the input of the call before
it (nothing here is warm-started: no chain is rewritten).

Models: ``tanh`` (``suite.TanhMLP``: Linear + tanh, reads no Python value) and ``reading``
(``ReadingMLP``: each layer reads its own ``self.scale``, all read one shared plain object's
``settings.gain`` and a module-level global: L + 2 recorded reads, the guard's worst case per layer).
"""
from __future__ import annotations

import argparse
import itertools
import sys
import timeit
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deeppcr_fx as deeppcr  # noqa: E402
from deeppcr_fx.signature import signature  # noqa: E402
from deeppcr_fx.passes.hooks import hook_epoch  # noqa: E402
from suite import TanhMLP  # noqa: E402


INPUTS = 16
GAIN = 1.0  # a module-level global ReadingMLP's forward reads


class _Settings:
    gain = 1.0

    def __init__(self) -> None:
        self.gain = 1.0


class _ScaledLinear(nn.Linear):
    def __init__(self, w: int) -> None:
        super().__init__(w, w)
        self.scale = 1.0


class ReadingMLP(nn.Module):
    def __init__(self, L: int, w: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_ScaledLinear(w) for _ in range(L))
        self.settings = _Settings()

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x) * layer.scale * self.settings.gain * GAIN)
        return x


MODELS = {"tanh": TanhMLP, "reading": ReadingMLP}


def measure(L: int, w: int, number: int, rounds: int = 9, kind: str = "tanh") -> dict:
    torch.manual_seed(0)
    model, xs = MODELS[kind](L, w), itertools.cycle([torch.randn(1, w) for _ in range(INPUTS)])
    compiled = deeppcr.compile(model, policy="never")

    def guards():  # what CompiledModule.forward checks on every call before it dispatches
        spec = compiled._specialisations.get(signature((next(xs),), compiled._flag_modules))
        return hook_epoch() != compiled._hook_epoch, spec.reads is None or spec.reads.holds()

    calls = {"eager": lambda: model(next(xs)), "compiled": lambda: compiled(next(xs)), "guards": guards}
    best = {name: float("inf") for name in calls}
    with torch.no_grad():
        compiled(next(xs))
        for _ in range(rounds):  # interleaved: a slow spell of the host hits every variant alike
            for name, fn in calls.items():
                best[name] = min(best[name], timeit.timeit(fn, number=number) / number)
    reads = compiled._last.reads
    return dict(model=kind, L=L, w=w, modules=len(list(model.modules())), reads=len(reads) if reads else 0,
                **{f"{k}_us": 1e6 * v for k, v in best.items()})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--L", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--w", type=int, default=4)
    ap.add_argument("--number", type=int, default=200)
    ap.add_argument("--model", nargs="+", default=["tanh", "reading"], choices=sorted(MODELS))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"{'model':>8} {'L':>5} {'modules':>8} {'reads':>6} {'eager us':>10} {'compiled us':>12} "
          f"{'overhead us':>12} {'guards us':>10}")
    for kind in args.model:
        for L in args.L:
            r = measure(L, args.w, max(1, args.number * 64 // L), kind=kind)
            print(f"{kind:>8} {r['L']:>5} {r['modules']:>8} {r['reads']:>6} {r['eager_us']:>10.1f} "
                  f"{r['compiled_us']:>12.1f} {r['compiled_us'] - r['eager_us']:>12.1f} {r['guards_us']:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
