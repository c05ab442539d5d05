"""DeepPCR's first two experiments, measured: forward and backward speed-up of a deep tanh MLP vs depth and width.

    python examples/mlp_speed.py [--quick | --smoke] [--widths 2,4,8] [--depths 64,256,1024]
                                 [--method compile|solve] [--threads N]

The model is ``nn.Sequential(Linear(w, w), Tanh(), ...)`` with L layers, batch 1 (the paper's
setting: a chain of small steps). The sequential baseline is the eager model itself. The
parallel version is

- ``deeppcr.compile(model, policy="always")`` (default): the compiler finds the chain and
  replaces it with one ``PCRSolve`` (Newton + PCR); or, with ``--method solve``,
- ``deeppcr.solve(step, x, per_step=(W, b))`` on the layers' Parameters stacked in each forward
  (as the compiled graph does): the runtime that ``PCRSolve`` calls, without the compiler.

Forward: under ``torch.no_grad()``. Backward: the ``.backward()`` call alone, after an untimed
forward (autograd through the eager model vs DeepPCR's parallel adjoint), with an optimizer step
(SGD, lr 1e-4, untimed) between backward calls, as in training. Every timed call gets a fresh
random input (made untimed), so a warm start never meets the solution of the same input. The
compiled model starts each solve from its previous call's solution (a warm start, another
input's); the ``cold`` forward forgets it first (Newton from the input, as on a first call) and
is shown beside it. ``deeppcr.solve`` (``--method solve``) has no warm start: every call is cold.
The backward has none either (the adjoint starts from zero on every call). Outputs and
gradients are checked against the eager model before timing, on an input the compiled model has
not seen (warm and cold). Every time is a median of alternating runs in this process; the
speed-up is eager time / DeepPCR time (< 1 means slower). The figure is the paper's phase
diagram (speed-up over width x depth), measured on this machine.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import deeppcr_fx as deeppcr  # noqa: E402

OUT_TOL, GRAD_TOL = 1e-4, 1e-3  # relative max-norm errors vs the eager model (float32)
PRESETS = {  # widths, depths, repeats
    "smoke": ((4,), (16, 64), 2),
    "quick": ((4, 16), (64, 256, 1024), 5),
    "full": ((2, 4, 8, 16, 32), (64, 256, 1024, 4096), 7),
}


def tanh_mlp(depth: int, width: int, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers)


def _step(z: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.tanh(F.linear(z, W, b))


class Parallel:
    """The DeepPCR version of one MLP: ``forward(x)`` returns the last layer's output."""

    def __init__(self, model: nn.Sequential, x: torch.Tensor, use_compile: bool) -> None:
        self.model, self.method = model, "compile" if use_compile else "solve"
        self.compile_s = 0.0
        if use_compile:
            self.compiled = deeppcr.compile(model, policy="always")
            t0 = time.perf_counter()
            for grad in (False, True):  # one specialisation per grad mode: compile both before timing
                with torch.set_grad_enabled(grad):
                    self.compiled(x)
            self.compile_s = time.perf_counter() - t0
            report = self.compiled.report
            if not report.rewritten:
                raise SystemExit(f"deeppcr.compile did not rewrite the MLP:\n{report}")
        self._solve_stats = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.method == "compile":
            return self.compiled(x)
        # stack the Parameters inside the forward, as the compiled graph does: gradients reach all 2L of them
        W = torch.stack([m.weight for m in self.model[::2]])
        b = torch.stack([m.bias for m in self.model[::2]])
        res = deeppcr.solve(_step, x, per_step=(W, b))
        self._solve_stats = res.stats
        return res.states[-1]

    @property
    def stats(self) -> deeppcr.SolveStats:
        """The latest solve's stats (read untimed, after a call)."""
        if self.method == "compile":
            return _common.solves(self.compiled)[0].last_stats
        return self._solve_stats

    def forget(self) -> None:
        """Before a cold call: forget the previous solution (``deeppcr.solve`` keeps none)."""
        if self.method == "compile":
            _common.reset_warm_starts(self.compiled)

    def grads(self) -> tuple:
        """(dW, db) stacked, after a backward."""
        return (torch.stack([m.weight.grad for m in self.model[::2]]),
                torch.stack([m.bias.grad for m in self.model[::2]]))

    def zero_grad(self) -> None:
        self.model.zero_grad(set_to_none=True)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def measure(width: int, depth: int, repeats: int, use_compile: bool, seed: int) -> dict:
    model = tanh_mlp(depth, width, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    fresh = lambda: torch.randn(1, width, generator=gen)  # noqa: E731  (a new input of the same shape)
    par = Parallel(model, fresh(), use_compile)

    # correctness first, on an input the compiled model has not seen: outputs (warm start from another
    # input's solution, and cold) and parameter gradients against the eager model
    x = fresh()
    with torch.no_grad():
        y_ref, y = model(x), par.forward(x)
        par.forget()
        y_cold = par.forward(x)
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()
    g_ref = (torch.stack([m.weight.grad for m in model[::2]]), torch.stack([m.bias.grad for m in model[::2]]))
    par.zero_grad()
    par.forward(x).sum().backward()
    g = par.grads()
    bwd_iters = par.stats.backward.iterations if par.stats.backward is not None else 0
    out_err = max(_rel(y, y_ref), _rel(y_cold, y_ref))
    grad_err = max(_rel(a, b) for a, b in zip(g, g_ref))

    # forward: a fresh input for every call; "cold" forgets the previous solution first (it runs right
    # after "deeppcr", in the same grad mode: the same specialisation)
    its: dict = {"deeppcr": [], "cold": []}
    cold_warm = []  # whether a cold call started warm (it must not)

    def setup_fwd(name: str) -> torch.Tensor:
        if name == "cold":
            par.forget()
        return fresh()

    def after_fwd(name: str) -> None:
        if name != "eager":
            its[name].append(par.stats)
            if name == "cold":
                cold_warm.append(par.stats.warm_start)

    fwd_fns = {"eager": model, "deeppcr": par.forward}
    if use_compile:
        fwd_fns["cold"] = par.forward
    with torch.no_grad():
        fwd = _common.time_alternating(fwd_fns, repeats, setup_fwd, after_fwd)
    if any(cold_warm):
        raise SystemExit("a cold call started from a previous solution: the cold timings would be warm")

    # backward, as in training: an optimizer step between calls, a fresh input, a fresh forward graph
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def prepare(name: str) -> torch.Tensor:  # untimed
        if any(p.grad is not None for p in model.parameters()):
            opt.step()
        par.zero_grad()
        xi = fresh()
        return (model(xi) if name == "eager" else par.forward(xi)).sum()

    bwd = _common.time_alternating({"eager": lambda loss: loss.backward(), "deeppcr": lambda loss: loss.backward()},
                                   repeats, prepare)
    warm_it = max(its["deeppcr"], key=lambda st: (st.iterations, st.forward.prefix))
    cold_it = max(st.iterations for st in its["cold"]) if its["cold"] else None
    cold_ratio = fwd["eager"] / fwd["cold"] if "cold" in fwd else None
    return {
        "width": width, "depth": depth, "method": par.method,
        "Newton it warm/cold": (f"{_common.newton_its(warm_it)} / {cold_it}" if use_compile
                                else f"- / {warm_it.iterations}"),  # deeppcr.solve: every call is cold
        "adjoint it": bwd_iters,
        "out rel err": f"{out_err:.1e}", "grad rel err": f"{grad_err:.1e}",
        "check": "OK" if out_err <= OUT_TOL and grad_err <= GRAD_TOL else "MISMATCH",
        "fwd eager ms": _common.ms(fwd["eager"]), "fwd deeppcr ms": _common.ms(fwd["deeppcr"]),
        "fwd cold ms": _common.ms(fwd["cold"]) if "cold" in fwd else "-",
        "fwd speed-up": _common.ratio(fwd["eager"], fwd["deeppcr"]),
        "fwd speed-up cold": _common.ratio(fwd["eager"], fwd["cold"]) if "cold" in fwd else "-",
        "bwd eager ms": _common.ms(bwd["eager"]), "bwd deeppcr ms": _common.ms(bwd["deeppcr"]),
        "bwd speed-up": _common.ratio(bwd["eager"], bwd["deeppcr"]),
        "compile s": f"{par.compile_s:.1f}" if use_compile else "-",
        "_fwd": fwd["eager"] / fwd["deeppcr"], "_cold": cold_ratio, "_bwd": bwd["eager"] / bwd["deeppcr"],
    }


def plot(rows: list, widths: tuple, depths: tuple, path: str, header: str) -> None:
    plt = _common.pyplot()
    if plt is None:
        return
    from matplotlib.colors import LogNorm

    panels = [("_fwd", "forward (warm start)"), ("_cold", "forward, cold (no warm start)"), ("_bwd", "backward")]
    if any(r["_cold"] is None for r in rows):  # deeppcr.solve: no warm start, one forward panel
        panels = [("_fwd", "forward (no warm start)"), ("_bwd", "backward")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 0.55 * len(widths) + 2.4),
                             constrained_layout=True)
    cells = {(r["width"], r["depth"]): r for r in rows}
    values = [r[k] for r in rows for k, _ in panels]
    bound = max(max(values), 1 / min(values), 2.0)
    for ax, (key, name) in zip(axes, panels):
        grid = [[cells[(w, L)][key] for L in depths] for w in widths]
        im = ax.imshow(grid, cmap="RdBu", norm=LogNorm(1 / bound, bound), origin="lower", aspect="auto")
        for i, w in enumerate(widths):
            for j, L in enumerate(depths):
                v = grid[i][j]
                ax.text(j, i, f"{v:.2f}x", ha="center", va="center", fontsize=8,
                        color="white" if abs(math.log(v)) > 0.6 * math.log(bound) else "black")
        ax.set_xticks(range(len(depths)), [str(L) for L in depths])
        ax.set_yticks(range(len(widths)), [str(w) for w in widths])
        ax.set_xlabel("depth L (layers)")
        ax.set_ylabel("width w")
        ax.set_title(f"{name} speed-up (eager / DeepPCR)", fontsize=9)
    fig.colorbar(im, ax=axes, label="speed-up (blue > 1: DeepPCR faster)")
    fig.suptitle(header, fontsize=9)
    _common.save(fig, path)


def main(argv=None) -> int:
    p = _common.parser(__doc__.splitlines()[0], "mlp_speed.png")
    p.add_argument("--widths", type=lambda s: tuple(int(v) for v in s.split(",")), default=None)
    p.add_argument("--depths", type=lambda s: tuple(int(v) for v in s.split(",")), default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--method", choices=("compile", "solve"), default="compile",
                   help="deeppcr.compile the nn.Sequential (default), or call deeppcr.solve on its stacked weights")
    args = p.parse_args(argv)
    widths, depths, repeats = PRESETS[_common.mode_name(args)]
    widths, depths = args.widths or widths, args.depths or depths
    repeats = args.repeats or repeats
    _common.setup(args, "DeepPCR MLP forward/backward speed-up vs depth and width (tanh MLP, batch 1, float32)")

    rows = []
    for w in widths:
        for L in depths:
            row = measure(w, L, repeats, use_compile=args.method == "compile", seed=args.seed)
            rows.append(row)
            cold = f" (cold {row['fwd speed-up cold']})" if row["_cold"] is not None else ""
            print(f"  measured w={w:<3} L={L:<5} ({row['method']}): forward {row['fwd speed-up']}{cold}, "
                  f"backward {row['bwd speed-up']}", flush=True)
    print()
    print(_common.table([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
                        "summary (speed-up = eager ms / deeppcr ms, a fresh input every call; < 1x means DeepPCR "
                        "was slower here)"))
    best_f = max(rows, key=lambda r: r["_fwd"])
    best_b = max(rows, key=lambda r: r["_bwd"])
    line = f"\nbest forward speed-up {best_f['fwd speed-up']} at w={best_f['width']}, L={best_f['depth']}"
    if args.method == "compile":
        best_c = max(rows, key=lambda r: r["_cold"])
        line += f" (cold: {best_c['fwd speed-up cold']} at w={best_c['width']}, L={best_c['depth']})"
    print(line + f"; best backward speed-up {best_b['bwd speed-up']} at w={best_b['width']}, L={best_b['depth']}")
    if args.method == "solve":
        print("note: method 'solve' = deeppcr.solve on the layers' Parameters stacked in each forward (what the "
              "compiled graph runs; gradients reach all 2L Parameters); it keeps no previous solution, so every "
              "call is cold.")
    else:
        print("note: deeppcr (warm) starts each solve from its previous call's solution (another input's: "
              "every timed call gets a fresh one), 'cold' forgets it first; 'Newton it warm/cold' is the most any "
              "timed call took ('+Nseq': steps run sequentially to meet the warm start's guess). The backward "
              "has no warm start; an SGD step runs (untimed) between backward calls.")
    print(f"note: on a CPU the parallel rounds share {torch.get_num_threads()} thread(s); the paper's 30x/200x "
          "are on a GPU, where each PCR round runs all L rows at once.")
    failed = [r for r in rows if r["check"] != "OK"]
    print(f"check: outputs within {OUT_TOL:g} and gradients within {GRAD_TOL:g} (relative) of the eager model: "
          + ("all OK" if not failed else f"{len(failed)} MISMATCH(ES)"))
    if args.png != "none":
        plot(rows, widths, depths, args.png,
             f"tanh MLP, batch 1, float32, deeppcr.{args.method}, cpu, {torch.get_num_threads()} thread(s), "
             f"medians of {repeats} runs, a fresh input each")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
