"""Layer-parallel deeppcr.solve over 2 processes (one thread each) vs one process (issue 15).

    python benchmarks/layer_parallel.py [--L 4096 16384] [--w 4 16] [--B 1 8] [--repeats 5]
                                        [--microbatches 8] [--no-pipeline] [--out benchmarks/results/layer_parallel_cpu.csv]

One tanh MLP z_l = tanh(W_l z_{l-1} + b_l) (nn.Linear's default init, float32), L steps, width w,
batch B. Methods, each timed for a forward pass and a training step (forward + backward of
loss = sum(z_L^2), gradients to every W_l, b_l):

- ``sequential``    the plain loop, one process, one thread (autograd for the backward);
- ``solve``         ``deeppcr.solve`` (jacobian="full") in one process, one thread;
- ``layer-parallel`` ``deeppcr.solve(..., group=WORLD)`` over 2 gloo processes, one thread each,
                    each holding half of the steps;
- ``pipeline``      ``torch.distributed.pipelining`` with the GPipe schedule over the same 2
                    processes (each stage the sequential loop over its half), B split into
                    ``min(B, --microbatches)`` micro-batches (1 when B = 1).

Times are medians over ``--repeats`` runs after one warm-up, in milliseconds; a distributed time
runs from a barrier before the call to a barrier after it (rank 0's clock). The table's
``vs solve`` column is the one-process solve's time divided by the method's time.
Target (issue 15): layer-parallel >= 1.6x faster than solve at L = 16384, and faster than the
pipeline at B = 1. Run it on an otherwise idle machine: 2 processes want 2 cores.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import deeppcr_fx as deeppcr  # noqa: E402


def step(z, W, b):
    return torch.tanh(F.linear(z, W, b))


def make(L: int, w: int, B: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    bound = 1 / w ** 0.5  # nn.Linear's default init
    W = (torch.rand(L, w, w, generator=g) * 2 - 1) * bound
    b = (torch.rand(L, w, generator=g) * 2 - 1) * bound
    x = torch.randn(B, w, generator=g)
    return W, b, x


def median_ms(fn, repeats: int, sync=None) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# --- one process -----------------------------------------------------------------------------------
def sequential(x, W, b):
    z = x
    for l in range(W.shape[0]):
        z = step(z, W[l], b[l])
    return z


def single_process(L: int, w: int, B: int, repeats: int) -> list:
    W, b, x = make(L, w, B)
    Wl, bl = W.clone().requires_grad_(), b.clone().requires_grad_()
    rows = []

    def seq_train():
        Wl.grad = bl.grad = None
        sequential(x, Wl, bl).square().sum().backward()

    def solve_fwd():
        with torch.no_grad():
            return deeppcr.solve(step, x, per_step=(W, b), jacobian="full")

    def solve_train():
        Wl.grad = bl.grad = None
        res = deeppcr.solve(step, x, per_step=(Wl, bl), jacobian="full")
        res.states[-1].square().sum().backward()

    with torch.no_grad():
        fwd = median_ms(lambda: sequential(x, W, b), repeats)
    rows.append(("sequential", fwd, median_ms(seq_train, repeats), ""))
    its = solve_fwd().stats.iterations
    rows.append(("solve", median_ms(solve_fwd, repeats), median_ms(solve_train, repeats), its))
    return rows


# --- two processes -----------------------------------------------------------------------------------
class Stage(torch.nn.Module):
    """One pipeline stage: the sequential loop over its slice of the steps."""

    def __init__(self, W: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.W, self.b = torch.nn.Parameter(W.clone()), torch.nn.Parameter(b.clone())

    def forward(self, z):
        return sequential(z, self.W, self.b)


def layer_parallel(rank: int, P: int, L: int, w: int, B: int, repeats: int) -> tuple:
    W, b, x = make(L, w, B)
    lo, hi = L * rank // P, L * (rank + 1) // P
    Wl, bl = W[lo:hi].clone().requires_grad_(), b[lo:hi].clone().requires_grad_()
    group, last = dist.group.WORLD, rank == P - 1

    def fwd():
        with torch.no_grad():
            return deeppcr.solve(step, x if rank == 0 else None, per_step=(W[lo:hi], b[lo:hi]), group=group,
                                 jacobian="full")

    def train():
        Wl.grad = bl.grad = None
        res = deeppcr.solve(step, x if rank == 0 else None, per_step=(Wl, bl), group=group, jacobian="full")
        if last:
            res.states[-1].square().sum().backward()
        else:  # every rank takes part in the backward pass; this one's states do not enter the loss
            torch.autograd.backward(res.states, torch.zeros_like(res.states))

    res = fwd()
    return (median_ms(fwd, repeats, dist.barrier), median_ms(train, repeats, dist.barrier),
            res.stats.iterations, res.volume // max(1, res.stats.iterations))


def pipeline(rank: int, P: int, L: int, w: int, B: int, repeats: int, microbatches: int) -> tuple:
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    W, b, x = make(L, w, B)
    lo, hi = L * rank // P, L * (rank + 1) // P
    chunks = min(B, microbatches)
    stage_module = Stage(W[lo:hi], b[lo:hi])
    # shapes are inferred on the first step (explicit input_args left stage 1's input without grad)
    train_schedule = ScheduleGPipe(PipelineStage(stage_module, rank, P, torch.device("cpu")), n_microbatches=chunks,
                                   loss_fn=lambda out, target: out.square().sum())
    eval_schedule = ScheduleGPipe(PipelineStage(stage_module, rank, P, torch.device("cpu")), n_microbatches=chunks)
    target = torch.zeros(B, w)

    def fwd():
        with torch.no_grad():
            if rank == 0:
                eval_schedule.eval(x)
            else:
                eval_schedule.eval()

    def train():
        stage_module.zero_grad(set_to_none=True)
        if rank == 0:
            train_schedule.step(x)
        elif rank == P - 1:
            train_schedule.step(target=target, losses=[])
        else:
            train_schedule.step()

    return median_ms(fwd, repeats, dist.barrier), median_ms(train, repeats, dist.barrier)


def _worker(rank: int, P: int, init: str, configs: list, repeats: int, microbatches: int, use_pipeline: bool,
            out: str, timeout_s: float) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=P,
                            timeout=datetime.timedelta(seconds=timeout_s))
    rows = []
    for L, w, B in configs:
        fwd, train, its, per_it = layer_parallel(rank, P, L, w, B, repeats)
        rows.append((L, w, B, "layer-parallel", fwd, train, its, per_it))
        if use_pipeline:
            try:
                fwd, train = pipeline(rank, P, L, w, B, repeats, microbatches)
                rows.append((L, w, B, "pipeline", fwd, train, "", ""))
            except Exception as exc:  # report, do not hide: the table says why the row is missing
                rows.append((L, w, B, f"pipeline failed: {type(exc).__name__}: {exc}"[:200], float("nan"),
                             float("nan"), "", ""))
                use_pipeline = False
    if rank == 0:
        torch.save(rows, out)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--L", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--w", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--B", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--no-pipeline", action="store_true")
    parser.add_argument("--timeout", type=float, default=600.0, help="process group timeout, seconds")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "layer_parallel_cpu.csv"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    configs = [(L, w, B) for L in args.L for w in args.w for B in args.B]

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.pt")
        mp.spawn(_worker, args=(2, f"file://{os.path.join(tmp, 'store')}", configs, args.repeats, args.microbatches,
                                not args.no_pipeline, out, args.timeout), nprocs=2, join=True)
        two = torch.load(out, weights_only=False)
    rows = []
    for L, w, B in configs:  # one process after the two: nothing else runs meanwhile
        for method, fwd, train, its in single_process(L, w, B, args.repeats):
            rows.append((L, w, B, method, fwd, train, its, ""))
        rows += [r for r in two if r[:3] == (L, w, B)]
    header = ("L", "w", "B", "method", "forward_ms", "train_ms", "iterations", "elements_per_iteration")
    base = {(r[0], r[1], r[2]): r for r in rows if r[3] == "solve"}
    print(f"{'L':>6} {'w':>3} {'B':>2} {'method':<15} {'fwd ms':>9} {'train ms':>9} {'fwd vs solve':>12} "
          f"{'train vs solve':>14} {'its':>4}")
    for r in rows:
        s = base[r[:3]]
        print(f"{r[0]:>6} {r[1]:>3} {r[2]:>2} {r[3]:<15} {r[4]:>9.1f} {r[5]:>9.1f} {s[4] / r[4]:>11.2f}x "
              f"{s[5] / r[5]:>13.2f}x {r[6]!s:>4}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
