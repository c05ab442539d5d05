"""DeepPCR's third experiment: train a 1024-layer residual MLP with the forward and backward passes parallel.

    python examples/train_deep_resnet.py [--quick | --smoke] [--layers 1024] [--width 8] [--steps 100] [--threads N]

Data: scikit-learn's ``load_digits`` (8x8 digit images, 10 classes; no download), standardised,
split 75/25. Model: ``Linear(64, w)``, then ``L`` residual blocks ``x + a * tanh(Linear(w, w)(x))``
(``a = 1/sqrt(L)``), then ``Linear(w, 10)``. Three copies start from the same initialisation and see
the same mini-batches (Adam): the plain eager model; ``deeppcr.compile(copy, policy="always")``,
whose residual stack runs as one ``PCRSolve`` (Newton + PCR forward, parallel adjoint backward) and
starts each solve from the previous step's solution (a warm start: the previous mini-batch's, under
the previous step's weights); and the same compiled without warm starts (``warm_start=False``,
"cold": every solve starts from the input). The loss curves must agree to float32 round-off; the
script checks it.

Time per step (forward + backward + optimiser step) is a median over steps, the three models
trained in turn (the order rotates every step) in this process; every step draws a fresh
mini-batch. Test accuracy is each model's own weights, evaluated with the plain eager forward (a
compiled model shares its Parameters with its copy).
"""
from __future__ import annotations

import copy
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import deeppcr_fx as deeppcr  # noqa: E402

PRESETS = {  # layers, width, steps, batch
    "smoke": (16, 8, 6, 32),
    "quick": (256, 8, 40, 64),
    "full": (1024, 8, 100, 64),
}


class Block(nn.Module):
    def __init__(self, width: int, scale: float) -> None:
        super().__init__()
        self.lin, self.scale = nn.Linear(width, width), scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale * torch.tanh(self.lin(x))


class ResMLP(nn.Module):
    def __init__(self, layers: int, width: int, n_in: int = 64, n_out: int = 10) -> None:
        super().__init__()
        self.inp = nn.Linear(n_in, width)
        self.blocks = nn.ModuleList(Block(width, 1 / math.sqrt(layers)) for _ in range(layers))
        self.out = nn.Linear(width, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.out(h)


def digits(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.25, random_state=seed, stratify=y)
    mean, std = X_tr.mean(0), X_tr.std(0) + 1e-6
    as_x = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    return as_x(X_tr), torch.tensor(y_tr), as_x(X_te), torch.tensor(y_te)


@torch.no_grad()
def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(X).argmax(1) == y).float().mean())


def solve_stats(compiled) -> deeppcr.SolveStats:
    return next(m for m in compiled.graph_module.modules() if isinstance(m, deeppcr.PCRSolve)).last_stats


def plot(log: dict, path: str, header: str) -> None:
    plt = _common.pyplot()
    if plt is None:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8), constrained_layout=True)
    steps = range(1, len(log["plain"]) + 1)
    a.plot(steps, log["plain"], lw=3, alpha=0.5, label="plain (sequential)")
    a.plot(steps, log["deeppcr"], "--", lw=1.2, color="k", label="deeppcr.compile (parallel, warm start)")
    a.plot(steps, log["cold"], ":", lw=1.2, color="C3", label="deeppcr.compile, cold (no warm start)")
    a.set_xlabel("training step")
    a.set_ylabel("cross-entropy (mini-batch)")
    a.set_title("training loss: the three curves coincide")
    a.legend()
    b.plot(steps, [1e3 * t for t in log["t_plain"]], ".", label="plain")
    b.plot(steps, [1e3 * t for t in log["t_deeppcr"]], ".", label="deeppcr.compile")
    b.plot(steps, [1e3 * t for t in log["t_cold"]], ".", label="deeppcr.compile, cold")
    b.set_yscale("log")
    b.set_xlabel("training step")
    b.set_ylabel("ms per step (fwd + bwd + Adam)")
    b.set_title("time per training step")
    b.legend()
    fig.suptitle(header, fontsize=9)
    _common.save(fig, path)


def main(argv=None) -> int:
    p = _common.parser(__doc__.splitlines()[0], "train_deep_resnet.png")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--lr", type=float, default=3e-3)
    args = p.parse_args(argv)
    layers, width, steps, batch = PRESETS[_common.mode_name(args)]
    layers, width = args.layers or layers, args.width or width
    steps, batch = args.steps or steps, args.batch or batch
    _common.setup(args, f"Training a {layers}-layer residual MLP (width {width}) on load_digits: "
                        "plain vs deeppcr.compile")

    X_tr, y_tr, X_te, y_te = digits(args.seed)
    torch.manual_seed(args.seed)
    plain = ResMLP(layers, width)
    twin = copy.deepcopy(plain)  # the same initialisation
    twin_cold = copy.deepcopy(plain)
    compiled = deeppcr.compile(twin, policy="always")
    compiled_cold = deeppcr.compile(twin_cold, policy="always", warm_start=False)
    opts = {"plain": torch.optim.Adam(plain.parameters(), lr=args.lr),
            "deeppcr": torch.optim.Adam(twin.parameters(), lr=args.lr),
            "cold": torch.optim.Adam(twin_cold.parameters(), lr=args.lr)}
    models = {"plain": plain, "deeppcr": compiled, "cold": compiled_cold}
    weights = {"plain": plain, "deeppcr": twin, "cold": twin_cold}

    t0 = time.perf_counter()
    compiled.specialise((X_tr[:batch],))  # compile for the training signature before timing
    compile_s = time.perf_counter() - t0
    compiled_cold.specialise((X_tr[:batch],))
    print(compiled.report)
    if not compiled.report.rewritten or not compiled_cold.report.rewritten:
        print("deeppcr.compile rewrote nothing (see the report above); nothing to compare.")
        return 1
    print(f"compiled in {compile_s:.1f} s\n")

    order = torch.Generator().manual_seed(args.seed + 1)
    names = list(models)
    log: dict = {k: [] for n in names for k in (n, f"t_{n}")}
    newton: dict = {"deeppcr": [], "cold": []}
    adjoint: dict = {"deeppcr": [], "cold": []}
    finishes, cold_warm = 0, 0
    for step in range(steps):
        idx = torch.randint(len(X_tr), (batch,), generator=order)  # a fresh mini-batch every step
        xb, yb = X_tr[idx], y_tr[idx]
        for name in names[step % 3:] + names[:step % 3]:  # rotate who goes first
            t = time.perf_counter()
            opts[name].zero_grad(set_to_none=True)
            loss = F.cross_entropy(models[name](xb), yb)
            loss.backward()
            opts[name].step()
            log[f"t_{name}"].append(time.perf_counter() - t)
            log[name].append(float(loss.detach()))
        for name in newton:
            st = solve_stats(models[name])
            newton[name].append(_common.newton_its(st))
            adjoint[name].append(st.backward.iterations if st.backward is not None else 0)
            finishes += st.sequential_finish is not None
        cold_warm += solve_stats(compiled_cold).warm_start
        if (step + 1) % max(1, steps // 5) == 0 or step == steps - 1:
            print(f"  step {step + 1:4d}/{steps}: loss plain {log['plain'][-1]:.4f}, deeppcr {log['deeppcr'][-1]:.4f}, "
                  f"cold {log['cold'][-1]:.4f}; ms/step plain {_common.ms(log['t_plain'][-1])}, "
                  f"deeppcr {_common.ms(log['t_deeppcr'][-1])}, cold {_common.ms(log['t_cold'][-1])}", flush=True)
    if cold_warm:
        print(f"ERROR: {cold_warm} cold solves started from a previous solution")
        return 1

    loss_gap = max(abs(a - b) for n in ("deeppcr", "cold") for a, b in zip(log["plain"], log[n]))
    with torch.no_grad():
        param_gap = max(float((a - b).abs().max()) for n in ("deeppcr", "cold")
                        for a, b in zip(plain.parameters(), weights[n].parameters()))
    t = {n: statistics.median(log[f"t_{n}"]) for n in names}
    def its(name: str) -> str:  # Newton iterations per step: median and the most (+Nseq: a warm start's prefix)
        counts = [int(v.split("+")[0]) for v in newton[name]]
        return f"{statistics.median(counts):g} (max {max(newton[name], key=lambda v: int(v.split('+')[0]))})"

    labels = {"plain": "plain (sequential)", "deeppcr": "deeppcr.compile", "cold": "deeppcr.compile, cold"}
    rows = [{"model": labels[n], "layers": layers, "width": width, "ms/step": _common.ms(t[n]),
             "speed-up": _common.ratio(t["plain"], t[n]),
             "final loss": f"{log[n][-1]:.4f}", "train acc": f"{accuracy(weights[n], X_tr, y_tr):.3f}",
             "test acc": f"{accuracy(weights[n], X_te, y_te):.3f}",
             "Newton it/step": "-" if n == "plain" else its(n),
             "adjoint it/step": "-" if n == "plain" else f"{statistics.mean(adjoint[n]):.1f}"} for n in names]
    print()
    print(_common.table(rows, f"summary ({steps} Adam steps, batch {batch}, lr {args.lr}, a fresh mini-batch every "
                              "step; ms/step = median of forward + backward + optimiser step; speed-up = plain / "
                              "this; cold = no warm start)"))
    print(f"\nstep-time ratio plain / deeppcr: {_common.ratio(t['plain'], t['deeppcr'])} with warm starts (each "
          f"solve starts from the previous step's solution), {_common.ratio(t['plain'], t['cold'])} cold (> 1x: "
          f"DeepPCR faster); compile time {compile_s:.1f} s (not in ms/step)")
    print(f"max |loss_plain - loss_deeppcr| over {steps} steps (warm and cold): {loss_gap:.2e}; "
          f"max |param_plain - param_deeppcr| at the end: {param_gap:.2e}; "
          f"solves with a sequential finish (warm and cold): {finishes}")
    agree = loss_gap <= 1e-3 * max(1.0, max(log["plain"]))
    print("loss curves agree" if agree else "LOSS CURVES DISAGREE (see above)")
    if args.png != "none":
        plot(log, args.png, f"{layers} residual layers, width {width}, load_digits, cpu, "
                            f"{torch.get_num_threads()} thread(s)")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
