"""``deeppcr.solve`` on CUDA: the eager runtime, the compiled iteration (Triton), the compiled iteration in
CUDA graphs, and the sequential PyTorch loop, on the tanh MLP problems of ``benchmarks/peers.py``.

    python benchmarks/_peers_cuda.py [--L 4096 16384] [--w 4 16] [--B 1] [--repeats 5]

Each timed call gets a fresh input; the variants alternate within each round; medians; CUDA synchronised
around each call. Writes ``benchmarks/results/peers_cuda.csv`` (run by ``benchmarks/gpu.sh``)."""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import torch

import deeppcr_fx as deeppcr

RESULTS = Path(__file__).resolve().parent / "results"


def mlp_step(z, W, b):
    return torch.tanh(torch.nn.functional.linear(z, W, b))


def _time(fn, x):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn(x)
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def run(L: int, w: int, B: int, repeats: int) -> list:
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(L, w, w, generator=g) / w ** 0.5).cuda()
    b = (torch.randn(L, w, generator=g) * 0.1).cuda()
    xs = [torch.randn(B, w, generator=g).cuda() for _ in range(repeats + 1)]

    def sequential(x):
        for l in range(L):
            x = mlp_step(x, W[l], b[l])
        return x

    def solver(**cfg):
        return lambda x: deeppcr.solve(mlp_step, x, per_step=(W, b), jacobian="full", **cfg)

    variants = {"eager_loop": sequential, "solve": solver(backend="eager"),
                "solve_inductor": solver(backend="inductor"),
                "solve_cuda_graphs": solver(backend="inductor", cuda_graphs=True)}
    rows = {}
    with torch.no_grad():
        want = sequential(xs[-1])
        for name, fn in variants.items():  # first call: compile
            first, out = _time(fn, xs[-1])
            last = out.states[-1] if hasattr(out, "states") else out
            its = out.stats.iterations if hasattr(out, "stats") else None
            rows[name] = dict(L=L, w=w, B=B, variant=name, first_call_s=first, iterations=its,
                              max_err=float((last - want).abs().max()), times=[])
        for i in range(repeats):
            for name, fn in variants.items():
                rows[name]["times"].append(_time(fn, xs[i])[0])
    for r in rows.values():
        r["ms"] = 1e3 * statistics.median(r.pop("times"))
    return list(rows.values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--L", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--w", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--B", type=int, nargs="+", default=[1])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    rows = []
    path = RESULTS / "peers_cuda.csv"
    for L in args.L:  # the file is rewritten after every row: a time limit keeps the rows done
        for w in args.w:
            for B in args.B:
                new = run(L, w, B, args.repeats)
                for r in new:  # the ratio against the eager loop of the same row
                    r["x_eager_loop"] = new[0]["ms"] / r["ms"]
                rows += new
                print(new, flush=True)
                with path.open("w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                    writer.writeheader()
                    writer.writerows(rows)
    print(f"wrote {path} ({torch.cuda.get_device_name()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
