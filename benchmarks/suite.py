"""The benchmark suites: eager sequential models vs ``deeppcr.compile`` (policy "always" and "auto").

    python benchmarks/suite.py --suite paper|resnet|diffusion|all --device cpu|cuda [--quick] [--threads N]
                               [--L 4096 --w 4 --B 1]   (a subset: suite_<suite>_<device>_subset.csv)
                               [--backend auto|eager|inductor]   (not auto: the file name ends _<backend>)

Every row measures, in this process, with alternating runs (in an order shuffled each round, so
no variant always follows the same neighbour) and medians over repeats (a speed-up is the median
of each round's eager/variant ratio):
- ``eager``: the model as a user writes it (per-layer modules in an ``nn.ModuleList``; the
  plain sampling loop driven by a diffusers scheduler); on CUDA also
  ``torch.compile(mode="reduce-overhead")`` of it (``cudagraph``);
- ``always`` / ``auto``: ``deeppcr.compile(model, policy=...)`` with default options;
  ``cold``: policy "always" with ``warm_start=False`` (every solve starts from scratch);
- the Newton iterations of the rewritten chain's latest solve (``3+19seq``: 3 iterations after
  19 sequential steps run to meet the warm start's guess) and the max error vs the eager output.

Each timed call gets a fresh random input (and a sampler fresh per-step noise), drawn untimed, so
warm starts never see an input they solved; a training step is forward + backward, with an
optimizer step (Adam, ``TRAIN_LR``) and ``zero_grad`` untimed between calls, so no call sees the
weights of the previous one (the weights are restored each round: the models stay at their
initialisation, see ``_time_mode``). A variant faster than ``SETTLE_S`` runs once untimed before its
timed calls in a round (a user calls the same model over and over, so its caches hold that model,
not the previous variant's solve), and the round keeps the faster of ``BEST_OF`` timed calls (as
``timeit``'s best-of). ``cold`` beside ``always`` shows what warm starts are worth.

Speed-ups are eager time / variant time. Results go to ``benchmarks/results/suite_<suite>_<device>.csv``
(and a PNG when matplotlib is installed).
"""
from __future__ import annotations

import argparse
import csv
import gc
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

import deeppcr_fx as deeppcr

RESULTS = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------------------- models
class TanhMLP(nn.Module):
    def __init__(self, L: int, w: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(w, w) for _ in range(L))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


class ResidualMLP(nn.Module):
    def __init__(self, L: int, w: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(w, w) for _ in range(L))
        for layer in self.layers:  # small residual updates, as in a trained deep ResNet
            nn.init.normal_(layer.weight, std=0.5 / w ** 0.5)
            nn.init.zeros_(layer.bias)

    def forward(self, x):
        for layer in self.layers:
            x = x + torch.tanh(layer(x))
        return x


class Sampler(nn.Module):
    """``for t in timesteps: x = scheduler.step(denoiser(x, t), t, x).prev_sample`` with an MLP denoiser."""

    def __init__(self, kind: str, steps: int, dim: int, hidden: int = 32) -> None:
        super().__init__()
        import diffusers

        self.scheduler = {"ddpm": diffusers.DDPMScheduler, "ddim": diffusers.DDIMScheduler}[kind](
            num_train_timesteps=1000)
        self.scheduler.set_timesteps(steps)
        self.inp, self.temb, self.out = nn.Linear(dim, hidden), nn.Linear(1, hidden), nn.Linear(hidden, dim)
        for p in self.out.parameters():
            p.data.mul_(0.1)

    def forward(self, x):
        self.scheduler._step_index = None
        for t in self.scheduler.timesteps:
            tt = t.to(x.dtype).reshape(1, 1) / 1000
            eps = self.out(torch.tanh(self.inp(x) + self.temb(tt)))
            x = self.scheduler.step(eps, t, x).prev_sample
        return x


# -------------------------------------------------------------------------------------- measuring
@dataclass
class Case:
    """One model and input shape; ``modes`` are measured on the same compiled models."""

    suite: str
    name: str
    model: nn.Module
    x: torch.Tensor  # the input's shape and dtype; each timed call draws a fresh input like it
    modes: tuple  # "forward" (under no_grad) and/or "train" (forward + backward)
    params: dict


# One intra-op thread on CPUs: on this project's shared 2-core machine torch's 2 threads made the
# solver's mid-sized ops 2-10x slower (every parallel region waits for a contended second core;
# compiled tanh MLP L=4096 w=4 train step 49 ms with 1 thread, 190 ms with 2), and the eager
# baseline's tiny ops run on one thread either way.
CPU_THREADS = 1
SAMPLE_S, MAX_REPEATS = 3.0, 150
TRAIN_LR = 1e-4  # Adam, between training calls: each parameter moves by about this much per step
SETTLE_S = 0.05  # a variant faster than this runs once untimed, then BEST_OF timed calls, each round
BEST_OF = 2
SLOW_S = 2.0  # a variant whose warm-up call takes longer than this is timed by that call alone (its first solve)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _solves(compiled) -> list:
    gm = getattr(compiled, "graph_module", None)
    return [] if gm is None else [m for m in gm.modules() if isinstance(m, deeppcr.PCRSolve)]


def _iterations(compiled) -> Optional[str]:
    """Newton iterations of the latest solve per chain (and the sequential prefix run to meet a warm start)."""
    its = [(m.last_stats.iterations, m.last_stats.forward.prefix) for m in _solves(compiled) if m.last_stats]
    if not its:
        return None
    worst = max(its)
    return f"{worst[0]}" + (f"+{worst[1]}seq" if worst[1] else "")


def _rewritten(compiled) -> int:
    report = getattr(compiled, "report", None)
    return 0 if report is None else len(report.rewritten)


def _variants(model: nn.Module, device: str, backend: str = "auto") -> Dict[str, Callable]:
    variants: Dict[str, Callable] = {"eager": model}
    variants["always"] = deeppcr.compile(model, policy="always", backend=backend)
    variants["cold"] = deeppcr.compile(model, policy="always", warm_start=False, backend=backend)
    variants["auto"] = deeppcr.compile(model, policy="auto", backend=backend)
    if device == "cuda":
        variants["cudagraph"] = torch.compile(model, mode="reduce-overhead")
    return variants


def _time_mode(case: Case, variants: Dict[str, Callable], mode: str, device: str, repeats: int) -> dict:
    model = case.model
    xs = [torch.randn_like(case.x) for _ in range(2)]  # to specialise on, and the warm-up's shared input
    # Adam (scale-free: a residual MLP's sum-loss gradients reach 1e5) between training calls; the
    # weights go back to ``initial`` each round, so the model stays at its initialisation however
    # many rounds run, while no call sees the weights (or the input) of the call before it
    opt = torch.optim.Adam(model.parameters(), lr=TRAIN_LR) if mode == "train" else None
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()} if mode == "train" else None

    def run(fn, x=None, seed=None):
        """Time one call on a fresh input (or ``x``, with no optimizer step); returns (seconds, output)."""
        if x is None:
            x = torch.randn_like(case.x)  # untimed; a sampler's per-step noise is fresh too (no reseeding)
            if opt is not None and any(p.grad is not None for p in model.parameters()):
                opt.step()  # untimed, between training calls
        if seed is not None:
            torch.manual_seed(seed)  # the same noise for every variant (a DDPM sampler draws some)
        if mode == "train":
            model.zero_grad(set_to_none=True)  # untimed, as an optimizer's zero_grad() is
            _sync(device)
            t0 = time.perf_counter()
            out = fn(x)
            out.sum().backward()
        else:
            _sync(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = fn(x)
        _sync(device)
        return time.perf_counter() - t0, out.detach()

    gc.collect()
    gc.freeze()  # the untimed collection each round then scans only new objects (a full one took 0.4 s)
    gc.disable()  # as timeit does: a collection of one variant's garbage would land on whichever call comes next
    restore = (lambda: model.load_state_dict(initial)) if initial is not None else (lambda: None)
    try:
        return _time_variants(case, variants, mode, device, repeats, run, xs, restore)
    finally:
        restore()
        model.zero_grad(set_to_none=True)
        gc.enable()
        gc.unfreeze()


def _round_order(names: List[str], rng: random.Random) -> List[str]:
    """A fresh random order each round (rotating one order would keep each variant's predecessor,
    and a variant that evicts the caches, a large solve, would always slow the same successor), with
    "eager" and "auto" next to each other: "auto" often runs the user's model as written, and its
    ratio to eager (which must stay >= 0.95) is only as precise as the two calls are close in time."""
    pair = ["eager", "auto"]
    rng.shuffle(pair)
    blocks = [pair] + [[n] for n in names if n not in pair]
    rng.shuffle(blocks)
    return [n for block in blocks for n in block]


def _time_variants(case: Case, variants: Dict[str, Callable], mode: str, device: str, repeats: int,
                   run: Callable, xs: list, restore: Callable[[], None]) -> dict:
    with torch.set_grad_enabled(mode == "train"):
        for fn in variants.values():  # compile untimed: each grad mode is its own specialisation
            if hasattr(fn, "specialise"):  # a deeppcr CompiledModule
                fn.specialise((xs[0],))
                run(fn, xs[0], seed=0)  # and the compiled backend's kernels (--backend inductor)
    # warm up (graph captures, caches) on one input and seed, which also gives each variant's error
    first, outputs = {}, {}
    for name, fn in variants.items():
        first[name], outputs[name] = run(fn, xs[-1], seed=0)
    errors = {name: float((out - outputs["eager"]).abs().max()) for name, out in outputs.items()}
    times: Dict[str, List[float]] = {name: [t] if t > SLOW_S else [] for name, t in first.items()}
    # cheap rows get more samples (about SAMPLE_S of eager time each): their medians are the noisiest
    repeats = max(repeats, min(MAX_REPEATS, math.ceil(SAMPLE_S / max(first["eager"], 1e-4))))
    rng = random.Random(0)
    for _ in range(repeats):
        gc.collect()  # untimed
        restore()  # untimed: training rounds start from the initial weights (no drift over many rounds)
        for name in _round_order(list(variants), rng):
            if first[name] <= SETTLE_S:
                run(variants[name])  # untimed: the caches hold this model, as in a user's loop
                # best of BEST_OF calls: this shared host often runs a call at half speed for a
                # moment, and a median over a two-mode mixture jumps between the modes
                times[name].append(min(run(variants[name])[0] for _ in range(BEST_OF)))
            elif first[name] <= SLOW_S:
                times[name].append(run(variants[name])[0])
    med = {name: statistics.median(ts) for name, ts in times.items()}
    row = dict(suite=case.suite, case=case.name, **case.params, mode=mode, device=device,
               eager_ms=1e3 * med["eager"])
    for name in variants:
        if name == "eager":
            continue
        row[f"{name}_ms"] = 1e3 * med[name]
        paired = len(times[name]) == len(times["eager"]) > 1
        # paired: the median of each round's ratio, which cancels the host's slow spells (seconds
        # long) better than a ratio of medians; a variant timed once is compared with eager's median
        row[f"{name}_speedup"] = (statistics.median(e / v for e, v in zip(times["eager"], times[name])) if paired
                                  else med["eager"] / med[name])
        row[f"{name}_max_err"] = errors[name]
    row["always_iterations"] = _iterations(variants["always"])
    row["cold_iterations"] = _iterations(variants["cold"])
    row["auto_rewrote"] = _rewritten(variants["auto"])
    row["repeats"] = len(times["eager"])  # variants slower than SLOW_S have one timing
    row["timed_once"] = " ".join(name for name, ts in times.items() if len(ts) == 1 and row["repeats"] > 1)
    return row


def measure(case: Case, device: str, repeats: int, backend: str = "auto") -> List[dict]:
    """One row per mode of ``case``: eager, deeppcr.compile (always, always without warm start, auto)."""
    case.model.to(device)
    case.x = case.x.to(device)
    variants = _variants(case.model, device, backend)
    return [_time_mode(case, variants, mode, device, repeats) for mode in case.modes]


# ----------------------------------------------------------------------------------------- suites
def paper(quick: bool) -> List[Case]:
    grid = dict(L=[256, 4096], w=[4, 16], B=[1]) if quick else dict(L=[64, 256, 1024, 4096], w=[2, 4, 16, 64],
                                                                          B=[1, 16])
    cases = []
    for L in grid["L"]:
        for w in grid["w"]:
            for B in grid["B"]:
                torch.manual_seed(0)
                cases.append(Case("paper", "tanh-mlp", TanhMLP(L, w), torch.randn(B, w), ("forward", "train"),
                                  dict(L=L, w=w, B=B)))
    return cases


def resnet(quick: bool) -> List[Case]:
    grid = [(256, 4), (1024, 4)] if quick else [(128, 4), (256, 8), (512, 8), (1024, 4), (1024, 16)]
    cases = []
    for L, w in grid:
        torch.manual_seed(0)
        cases.append(Case("resnet", "residual-mlp", ResidualMLP(L, w), torch.randn(16, w), ("train",),
                          dict(L=L, w=w, B=16)))
    return cases


def diffusion(quick: bool) -> List[Case]:
    grid = [("ddim", 50, 2)] if quick else [("ddpm", 1000, 2), ("ddim", 50, 2), ("ddpm", 1000, 64), ("ddim", 50, 64)]
    cases = []
    for kind, steps, dim in grid:
        torch.manual_seed(0)
        cases.append(Case("diffusion", f"{kind}-{steps}", Sampler(kind, steps, dim), torch.randn(64, dim),
                          ("forward",), dict(L=steps, w=dim, B=64)))
    return cases


SUITES = {"paper": paper, "resnet": resnet, "diffusion": diffusion}


# ----------------------------------------------------------------------------------------- output
def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "-" if v is None else str(v)


def print_table(rows: List[dict]) -> None:
    cols = ["suite", "case", "L", "w", "B", "mode", "eager_ms", "always_ms", "always_speedup", "always_iterations",
            "cold_speedup", "cold_iterations", "auto_ms", "auto_speedup", "auto_rewrote", "always_max_err"]
    cols += [c for c in ("cudagraph_ms", "cudagraph_speedup") if any(c in r for r in rows)]
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(cols, widths)))


def write(rows: List[dict], suite: str, device: str, tag: str = "") -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"suite_{suite}_{device}{'_' + tag if tag else ''}.csv"
    fields = sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no PNG: pip install matplotlib for plots)")
        return path
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{r['case']} L={r['L']} w={r['w']} B={r['B']} {r['mode']}" for r in rows]
    ax.barh([i - 0.2 for i in range(len(rows))], [r["always_speedup"] for r in rows], height=0.4, label="always")
    ax.barh([i + 0.2 for i in range(len(rows))], [r["auto_speedup"] for r in rows], height=0.4, label="auto")
    ax.legend(fontsize=7)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(range(len(rows)), labels, fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel("speed-up of deeppcr.compile over eager (policy 'always' and 'auto')")
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=120)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=[*SUITES, "all"], default="paper")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--L", type=int, nargs="+", help="only cases of these lengths (results get a _subset suffix)")
    ap.add_argument("--w", type=int, nargs="+", help="only cases of these widths")
    ap.add_argument("--B", type=int, nargs="+", help="only cases of these batch sizes")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--backend", choices=("auto", "eager", "inductor"), default="auto",
                    help="the rewritten chains' backend (default auto: eager until a compile pays for itself; "
                         "inductor: compiled from the first call, whose compile the untimed warm-up absorbs)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: 1 on cpu, see CPU_THREADS; torch's on cuda)")
    args = ap.parse_args(argv)
    threads = args.threads or (CPU_THREADS if args.device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    repeats = args.repeats or (3 if args.quick else 5)
    print(f"deeppcr_fx bench: suite={args.suite} device={args.device} torch={torch.__version__} "
          f"threads={torch.get_num_threads()} repeats={repeats} (medians of alternating runs)")
    for suite in (SUITES if args.suite == "all" else [args.suite]):
        rows = []
        for case in SUITES[suite](args.quick):
            if any(want and case.params[k] not in want for k, want in (("L", args.L), ("w", args.w), ("B", args.B))):
                continue
            rows += measure(case, args.device, repeats, args.backend)
            print(f"  measured {case.name} {case.params} {'/'.join(case.modes)}", flush=True)
        if not rows:
            continue
        print_table(rows)
        tag = "_".join(t for t in ("subset" if (args.L or args.w or args.B) else "",
                                       args.backend if args.backend != "auto" else "") if t)
        print(f"wrote {write(rows, suite, args.device, tag)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
