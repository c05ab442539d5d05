"""Layer-parallel deeppcr.solve over 2 processes (one thread each) vs one process (issue 15).

    python benchmarks/layer_parallel.py [--L 4096 16384] [--w 4 16] [--B 1 8] [--repeats 3]
                                        [--microbatches 8] [--no-pipeline] [--backend eager inductor] [--cut 0.5]
                                        [--out benchmarks/results/layer_parallel_cpu.csv]

Quick rerun of the issue-15 rows (L = 16384, B = 1, both widths, compiled and eager, GPipe; ~2-3 min on
two idle cores, the compiles in the warm-up round hit the on-disk inductor cache after the first run):

    python benchmarks/layer_parallel.py --L 16384 --w 4 16 --B 1 --repeats 5 --backend eager inductor \
        --out /tmp/lp.csv

One tanh MLP z_l = tanh(W_l z_{l-1} + b_l) (nn.Linear's default init, float32), L steps, width w,
batch B. Methods, each timed for a forward pass and a training step (forward + backward of
loss = sum(z_L^2), gradients to every W_l, b_l):

- ``sequential``    the plain loop, one process, one thread (autograd for the backward);
- ``solve``         ``deeppcr.solve`` (jacobian="full") in one process, one thread;
- ``layer-parallel`` ``deeppcr.solve(..., group=WORLD)`` over 2 gloo processes, one thread each,
                    rank 0 holding the first ``--cut`` of the steps (default half), rank 1 the rest;
- ``solve[inductor]``, ``layer-parallel[inductor]`` with ``--backend eager inductor``: the same with
                    ``Config.backend="inductor"`` (each rank's iterations compiled; the compile happens in
                    the untimed warm-up round); their ``vs solve`` columns compare with ``solve[inductor]``;
- ``pipeline``      ``torch.distributed.pipelining`` with the GPipe schedule over the same 2
                    processes (each stage the sequential loop over its half), B split into
                    ``min(B, --microbatches)`` micro-batches (1 when B = 1).

Honest timing: every timed call gets a fresh input x (drawn before the clock starts, the same on
both ranks); every training call is followed by an untimed ``optimizer.step()`` (SGD, lr 1e-3) on
that method's own copy of the weights, so no call repeats the previous one; the methods are
interleaved (each repeat runs all of them in turn, after one untimed warm-up call each), and the
table holds medians over ``--repeats`` calls, in milliseconds. The one-process methods run on rank 0
while rank 1 waits in a barrier (timed on rank 0 from just before to just after the call); a
two-process time runs from a barrier before the call to a barrier after it (rank 0's clock).
``vs solve`` is the one-process solve's time divided by the method's; ``vs pipeline`` likewise.
The ``cpu`` columns are medians of the calling thread's CPU time (``time.thread_time``; for a
two-process method the larger of the two ranks'): on a machine shared with other work they show
the work on the critical rank, which waiting and descheduling do not inflate; the wall-clock
columns are the measurement the target is about.
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


def fresh_x(B: int, w: int, call: int) -> torch.Tensor:
    """The input of timed call ``call``: the same on every rank, different for every call."""
    return torch.randn(B, w, generator=torch.Generator().manual_seed(10_000 + call))


def sequential(x, W, b):
    # unbind, not W[l]: indexing a Parameter L times makes its backward add L full-size gradients (O(L^2))
    z = x
    for W_l, b_l in zip(W.unbind(0), b.unbind(0)):
        z = step(z, W_l, b_l)
    return z


class Stage(torch.nn.Module):
    """One pipeline stage: the sequential loop over its slice of the steps."""

    def __init__(self, W: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.W, self.b = torch.nn.Parameter(W.clone()), torch.nn.Parameter(b.clone())

    def forward(self, z):
        return sequential(z, self.W, self.b)


class Method:
    """One variant: ``fwd(x)`` and ``train(x)`` (forward + backward; ``step()`` is the untimed optimizer
    step after it). ``both``: runs on both ranks (else rank 0 alone while rank 1 waits)."""

    both = False
    backend = "eager"  # Config.backend of the deeppcr rows
    ran = ""  # the backend the last forward solve ran (SolveStats.backend)
    iterations = ""
    per_iteration = ""

    def step(self) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class Sequential(Method):
    name = "sequential"

    def __init__(self, W, b, rank, P, B, microbatches):
        self.W, self.b = W, b
        self.Wp, self.bp = W.clone().requires_grad_(), b.clone().requires_grad_()
        self.opt = torch.optim.SGD([self.Wp, self.bp], lr=1e-3)

    def fwd(self, x):
        with torch.no_grad():
            sequential(x, self.W, self.b)

    def train(self, x):
        sequential(x, self.Wp, self.bp).square().sum().backward()


class Solve(Sequential):
    name, backend = "solve", "eager"

    def fwd(self, x):
        with torch.no_grad():
            res = deeppcr.solve(step, x, per_step=(self.W, self.b), jacobian="full", backend=self.backend)
        self.iterations = res.stats.iterations
        self.ran = res.stats.backend

    def train(self, x):
        res = deeppcr.solve(step, x, per_step=(self.Wp, self.bp), jacobian="full", backend=self.backend)
        res.states[-1].square().sum().backward()


def with_backend(kind, backend: str):
    """``kind`` (Solve or LayerParallel) running ``Config.backend=backend``; the eager ones keep their names."""
    if backend == "eager":
        return kind
    return type(f"{kind.__name__}_{backend}", (kind,), {"name": f"{kind.name}[{backend}]", "backend": backend})


class LayerParallel(Method):
    name, both, backend = "layer-parallel", True, "eager"
    cut = 0.5  # rank 0's share of the steps with 2 ranks (--cut)

    def __init__(self, W, b, rank, P, B, microbatches):
        L = W.shape[0]
        lo, hi = L * rank // P, L * (rank + 1) // P
        if P == 2:
            lo, hi = (0, round(L * self.cut)) if rank == 0 else (round(L * self.cut), L)
        self.rank, self.last = rank, rank == P - 1
        self.W, self.b = W[lo:hi].clone(), b[lo:hi].clone()
        self.Wp, self.bp = self.W.clone().requires_grad_(), self.b.clone().requires_grad_()
        self.opt = torch.optim.SGD([self.Wp, self.bp], lr=1e-3)

    def fwd(self, x):
        with torch.no_grad():
            res = deeppcr.solve(step, x if self.rank == 0 else None, per_step=(self.W, self.b),
                                group=dist.group.WORLD, jacobian="full", backend=self.backend)
        self.iterations = res.stats.iterations
        self.ran = res.stats.backend
        self.per_iteration = res.volume // max(1, res.stats.iterations)

    def train(self, x):
        res = deeppcr.solve(step, x if self.rank == 0 else None, per_step=(self.Wp, self.bp), group=dist.group.WORLD,
                            jacobian="full", backend=self.backend)
        if self.last:
            res.states[-1].square().sum().backward()
        else:  # every rank takes part in the backward pass; this one's states do not enter the loss
            torch.autograd.backward(res.states, torch.zeros_like(res.states))


class Pipeline(Method):
    name, both = "pipeline", True

    def __init__(self, W, b, rank, P, B, microbatches):
        from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

        L = W.shape[0]
        lo, hi = L * rank // P, L * (rank + 1) // P
        self.rank, self.P = rank, P
        chunks = min(B, microbatches)
        self.stage = Stage(W[lo:hi], b[lo:hi])
        # shapes are inferred on the first step (explicit input_args left stage 1's input without grad)
        self.train_schedule = ScheduleGPipe(PipelineStage(self.stage, rank, P, torch.device("cpu")),
                                            n_microbatches=chunks, loss_fn=lambda out, target: out.square().sum())
        self.eval_schedule = ScheduleGPipe(PipelineStage(self.stage, rank, P, torch.device("cpu")), n_microbatches=chunks)
        self.target = torch.zeros(B, W.shape[-1])
        self.opt = torch.optim.SGD(self.stage.parameters(), lr=1e-3)

    def fwd(self, x):
        with torch.no_grad():
            if self.rank == 0:
                self.eval_schedule.eval(x)
            else:
                self.eval_schedule.eval()

    def train(self, x):
        if self.rank == 0:
            self.train_schedule.step(x)
        elif self.rank == self.P - 1:
            self.train_schedule.step(target=self.target, losses=[])
        else:
            self.train_schedule.step()


def _timed(method: Method, kind: str, x: torch.Tensor, rank: int) -> tuple:
    """(wall ms, CPU ms): the CPU time of the calling thread, the larger of the two ranks' for a
    two-process method (a load-insensitive view of the work on the critical rank; waiting costs none)."""
    fn = method.fwd if kind == "fwd" else method.train
    dist.barrier()
    cpu = 0.0
    if method.both:
        t0, c0 = time.perf_counter(), time.thread_time()
        fn(x)
        cpu = time.thread_time() - c0
        dist.barrier()
        elapsed = time.perf_counter() - t0
    elif rank == 0:
        t0, c0 = time.perf_counter(), time.thread_time()
        fn(x)
        elapsed, cpu = time.perf_counter() - t0, time.thread_time() - c0
        dist.barrier()
    else:
        elapsed = 0.0
        dist.barrier()
    if kind == "train" and (method.both or rank == 0):
        method.step()  # untimed: the next call sees new weights
    cpu_t = torch.tensor([cpu])
    dist.all_reduce(cpu_t, op=dist.ReduceOp.MAX)
    return elapsed * 1e3, float(cpu_t) * 1e3


def _worker(rank: int, P: int, init: str, configs: list, repeats: int, microbatches: int, use_pipeline: bool,
            out: str, timeout_s: float, backends: list, cut: float = 0.5) -> None:
    torch.set_num_threads(1)
    LayerParallel.cut = cut
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=P,
                            timeout=datetime.timedelta(seconds=timeout_s))
    rows = []
    call = 0
    for L, w, B in configs:
        W, b, _ = make(L, w, B)
        kinds = [Sequential] + [with_backend(k, be) for be in backends for k in (Solve, LayerParallel)] \
            + ([Pipeline] if use_pipeline else [])
        methods, failed = [], []
        for kind in kinds:
            try:
                methods.append(kind(W, b, rank, P, B, microbatches))
            except Exception as exc:  # report, do not hide: the table says why the row is missing
                failed.append((kind.name, f"{type(exc).__name__}: {exc}"[:200]))
        times = {(m.name, k): [] for m in methods for k in ("fwd", "train")}
        cpus = {(m.name, k): [] for m in methods for k in ("fwd", "train")}
        for r in range(repeats + 1):  # the first round is the untimed warm-up
            for m in methods:
                for kind in ("fwd", "train"):
                    call += 1
                    ms, cpu = _timed(m, kind, fresh_x(B, w, call), rank)
                    if r > 0:
                        times[(m.name, kind)].append(ms)
                        cpus[(m.name, kind)].append(cpu)
        for m in methods:
            name = m.name if m.ran in ("", m.backend) else f"{m.name} (ran {m.ran})"
            rows.append((L, w, B, name, statistics.median(times[(m.name, "fwd")]),
                         statistics.median(times[(m.name, "train")]), m.iterations, m.per_iteration,
                         statistics.median(cpus[(m.name, "fwd")]), statistics.median(cpus[(m.name, "train")])))
        for name, why in failed:
            rows.append((L, w, B, f"{name} failed: {why}", float("nan"), float("nan"), "", "", float("nan"),
                         float("nan")))
        if rank == 0:
            print(f"done L={L} w={w} B={B}", flush=True)
    if rank == 0:
        torch.save(rows, out)
    dist.destroy_process_group()


def _backend(method: str) -> str:
    """The backend a row's name says (``solve[inductor]``: inductor; plain names: eager); the ``vs solve``
    columns compare a row with the one-process solve of the same backend."""
    name = method.split(" ")[0]
    return name[name.index("[") + 1:-1] if "[" in name else "eager"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--L", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--w", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--B", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--no-pipeline", action="store_true")
    parser.add_argument("--backend", nargs="+", default=["eager"], choices=["eager", "inductor", "auto"],
                        help="Config.backend of the one-process solve and layer-parallel rows (one pair per backend; "
                             "a compiled backend's compile happens in the untimed warm-up round)")
    parser.add_argument("--timeout", type=float, default=600.0, help="process group timeout, seconds")
    parser.add_argument("--cut", type=float, default=0.5, help="layer-parallel: rank 0's share of the steps")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "layer_parallel_cpu.csv"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    configs = [(L, w, B) for L in args.L for w in args.w for B in args.B]

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.pt")
        mp.spawn(_worker, args=(2, f"file://{os.path.join(tmp, 'store')}", configs, args.repeats, args.microbatches,
                                not args.no_pipeline, out, args.timeout, args.backend, args.cut), nprocs=2, join=True)
        rows = torch.load(out, weights_only=False)
    header = ("L", "w", "B", "method", "forward_ms", "train_ms", "fwd_vs_solve", "train_vs_solve",
              "fwd_vs_pipeline", "train_vs_pipeline", "iterations", "elements_per_iteration",
              "forward_cpu_ms", "train_cpu_ms", "fwd_cpu_vs_solve", "train_cpu_vs_solve")
    solve = {r[:3] + (_backend(r[3]),): r for r in rows if r[3].split(" ")[0].startswith("solve")}
    pipe = {r[:3]: r for r in rows if r[3] == "pipeline"}

    def ratio(base, r, i):
        return "" if base is None or not r[i] == r[i] else f"{base[i] / r[i]:.2f}"

    table = []
    for r in rows:
        s, p = solve.get(r[:3] + (_backend(r[3]),)), pipe.get(r[:3])
        table.append((*r[:4], f"{r[4]:.1f}", f"{r[5]:.1f}", ratio(s, r, 4), ratio(s, r, 5), ratio(p, r, 4),
                      ratio(p, r, 5), r[6], r[7], f"{r[8]:.1f}", f"{r[9]:.1f}", ratio(s, r, 8), ratio(s, r, 9)))
    print(f"{'L':>6} {'w':>3} {'B':>2} {'method':<26} {'fwd ms':>9} {'train ms':>9} {'fwd/solve':>9} "
          f"{'train/solve':>11} {'fwd/pipe':>8} {'train/pipe':>10} {'its':>4} {'elem/it':>7} {'fwd cpu':>8} "
          f"{'train cpu':>9} {'cpu f/s':>7} {'cpu t/s':>7}")
    for t in table:
        print(f"{t[0]:>6} {t[1]:>3} {t[2]:>2} {t[3]:<26} {t[4]:>9} {t[5]:>9} {t[6]:>9} {t[7]:>11} {t[8]:>8} "
              f"{t[9]:>10} {t[10]!s:>4} {t[11]!s:>7} {t[12]:>8} {t[13]:>9} {t[14]:>7} {t[15]:>7}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(table)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
