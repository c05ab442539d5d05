"""Per-step Jacobians of a batched step: replicated batch vs vmap'd pullback vs forward mode.

    python benchmarks/jacobian_methods.py [--threads 1] [--repeats 10]

The three ways ``deeppcr_fx.runtime.jacobians`` can form J[r, b] = d step_r(z_b) / d z_b for
all L steps and B samples of a tanh MLP step (``tanh(F.linear(z, W_r, b_r))``, state width n):

- ``replicated``: one forward and backward of the steps on a batch of n * B samples
  (``jacobian_replicated``, used when n * B <= ``REPLICATE_MAX_SAMPLES``);
- ``rev``: the state's pullback vmapped over n cotangents (``jacobian_from_pullback``);
- ``fwd``: n JVP columns under vmap (the fallback when reverse mode fails).

All three are checked against each other before timing. Medians over ``--repeats`` rounds, the
three methods in turn, each call on fresh random states Z (drawn untimed); results go to
``benchmarks/results/jacobian_methods_cpu.txt``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import vjp, vmap

from deeppcr_fx.runtime import jacobians

CASES = [(4096, 4, 1), (4096, 4, 16), (1024, 16, 1), (1024, 16, 16), (256, 64, 1)]


def _medians_ms(methods: dict, fresh, repeats: int) -> dict:
    """Median ms per method: the methods in turn, each call on a fresh input ``fresh()`` (drawn untimed)."""
    times = {name: [] for name in methods}
    for fn in methods.values():  # one untimed call each (first-call costs)
        fn(fresh())
    for _ in range(repeats):
        for name, fn in methods.items():
            Z = fresh()
            t0 = time.perf_counter()
            fn(Z)
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def run(L: int, n: int, B: int, repeats: int) -> dict:
    torch.manual_seed(0)
    W, b, Z = torch.randn(L, n, n) / n ** 0.5, torch.randn(L, n), torch.randn(L, B, n)
    g = lambda Z: vmap(lambda z, W, b: torch.tanh(F.linear(z, W, b)))(Z, W, b)  # noqa: E731

    def rev(Z):
        vals, pullback = vjp(g, Z)
        return jacobians.jacobian_from_pullback(lambda c: pullback(c)[0], vals, "full")

    methods = {"replicated": lambda Z: jacobians.jacobian_replicated(g, Z, "full"), "rev": rev,
               "fwd": lambda Z: jacobians.evaluate(g, Z, "full", "fwd")[1]()}
    reference = rev(Z)
    for name, fn in methods.items():
        torch.testing.assert_close(fn(Z), reference, rtol=1e-4, atol=1e-5, msg=f"{name} disagrees")
    return dict(L=L, n=n, B=B, **_medians_ms(methods, lambda: torch.randn_like(Z), repeats))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines = [f"Jacobian methods, tanh MLP step, ms per Jacobian of all L steps (medians of {args.repeats}; "
             f"torch {torch.__version__}, {args.threads} thread(s))",
             f"{'L':>5} {'n':>3} {'B':>3} {'n*B':>5} {'replicated':>11} {'rev':>8} {'fwd':>8}"]
    for L, n, B in CASES:
        r = run(L, n, B, args.repeats)
        lines.append(f"{L:>5} {n:>3} {B:>3} {n * B:>5} {r['replicated']:>11.2f} {r['rev']:>8.2f} {r['fwd']:>8.2f}")
        print(lines[-1] if len(lines) > 3 else "\n".join(lines), flush=True)
    path = Path(__file__).parent / "results" / "jacobian_methods_cpu.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
