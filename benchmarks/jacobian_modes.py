"""The numbers behind ``jacobian="auto"``: solve time per Jacobian mode as the state widens.

    python benchmarks/jacobian_modes.py [--L 256] [--B 4] [--widths 4 16 32 64] [--chains tanh residual]

For two chains (a tanh MLP and a residual MLP z + 0.5 tanh(W z + b)) and each per-sample
state width n, it solves with every Jacobian mode and prints the median time, the Newton
iterations (the most any timed solve took) and whether a solve had to finish sequentially.
The modes and the sequential loop run in turn, ``--repeats`` rounds, each call on a fresh random
initial state (drawn untimed; ``deeppcr.solve`` keeps no warm start, so every solve is cold). ``full`` costs n Jacobian
passes plus O(n^3) a scan round and converges quadratically; ``diag`` pays the same n
passes for a cheaper scan and linear convergence; ``identity`` needs no Jacobian at all.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import torch
torch.set_num_threads(1)  # timings on a shared 2-core machine: no intra-op thread contention
import torch.nn.functional as F

import deeppcr_fx as deeppcr

CHAINS = {
    "tanh": lambda z, W, b: torch.tanh(F.linear(z, W, b)),
    "residual": lambda z, W, b: z + 0.5 * torch.tanh(F.linear(z, W, b)),
}


MODES = ("full", "diag", "identity")


def measure(chain: str, L: int, B: int, n: int, repeats: int, modes: tuple = MODES) -> list:
    """One row per mode; the modes and the sequential loop in turn, each call on a fresh x0."""
    g = torch.Generator().manual_seed(n)
    W = torch.randn(L, n, n, generator=g) / n ** 0.5
    b = torch.randn(L, n, generator=g) * 0.1
    step = CHAINS[chain]

    def sequential(x0):
        z = x0
        for l in range(L):
            z = step(z, W[l], b[l])
        return z

    fns = {"seq": sequential, **{m: (lambda x0, m=m: deeppcr.solve(step, x0, per_step=(W, b), jacobian=m).stats)
                                 for m in modes}}
    times = {k: [] for k in fns}
    stats = {m: [] for m in modes}
    with torch.no_grad():
        for _ in range(repeats):
            for name, fn in fns.items():
                x0 = torch.randn(B, n, generator=g)  # untimed: a fresh initial state every call
                t0 = time.perf_counter()
                out = fn(x0)
                times[name].append(time.perf_counter() - t0)
                if name in stats:
                    stats[name].append(out)
    seq_ms = 1e3 * statistics.median(times["seq"])
    rows = []
    for m in modes:
        finishes = sorted({st.sequential_finish.value for st in stats[m] if st.sequential_finish is not None})
        rows.append(dict(chain=chain, L=L, B=B, n=n, mode=m, ms=1e3 * statistics.median(times[m]), seq_ms=seq_ms,
                         iterations=max(st.iterations for st in stats[m]), sequential_finish=" ".join(finishes)))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--L", type=int, default=256)
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--widths", type=int, nargs="+", default=[4, 16, 32, 64])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chains", nargs="+", default=list(CHAINS), choices=list(CHAINS))
    ap.add_argument("--csv", default=str(Path(__file__).parent / "results" / "jacobian_modes_cpu.csv"))
    args = ap.parse_args(argv)
    rows = []
    measure("tanh", 8, 1, 2, 1)  # warm up torch.func's first-call costs
    print(f"{'chain':<9} {'n':>4} {'mode':<9} {'ms':>9} {'seq ms':>8} {'iters':>6}  finish")
    for chain in args.chains:
        for n in args.widths:
            for r in measure(chain, args.L, args.B, n, args.repeats):
                rows.append(r)
                print(f"{chain:<9} {n:>4} {r['mode']:<9} {r['ms']:>9.1f} {r['seq_ms']:>8.1f} {r['iterations']:>6}  "
                      f"{r['sequential_finish'] or '-'}", flush=True)
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
