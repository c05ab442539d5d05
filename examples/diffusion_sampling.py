"""DeepPCR's fourth experiment: diffusion sampling loops run in parallel over their timesteps.

    python examples/diffusion_sampling.py [--quick | --smoke] [--ddpm-steps 1000] [--ddim-steps 50] [--threads N]

1. Train a small denoiser ``eps(x, t)`` (an MLP with a sinusoidal timestep embedding) on a 2-D
   toy distribution, scikit-learn's ``make_moons``, with diffusers' ``DDPMScheduler.add_noise``
   (1000 training timesteps).
2. Sample with the loop users write with diffusers,

       for t in scheduler.timesteps:
           x = scheduler.step(denoiser(x, t), t, x).prev_sample

   for DDPM (1000 steps, stochastic: its noise is drawn per step) and DDIM (50 steps,
   deterministic), once sequentially and once through ``deeppcr.compile(sampler, policy="always")``,
   which rewrites the loop into one ``PCRSolve`` over the timesteps (DDPM's per-step noise is
   drawn before the solve, in the original order, so both runs see the same noise under the
   same seed).
3. Print the max difference between the two sample sets (a cold solve, and a warm-started one on
   other noise), the times (medians of alternating runs, fresh noise for every timed call: a new
   starting point and, for DDPM, new per-step noise), the Newton iterations, and plot the sample
   sets side by side with the solver's convergence from scratch (a cold solve's
   ``PCRSolve.last_stats.residuals``: per iteration, the largest residual in units of the
   tolerance; a solve has converged when it is <= 1).

The compiled sampler starts each solve from its previous call's solution (a warm start: another
noise's trajectory); ``cold`` forgets it before each call (Newton from the starting noise, as on a
first call). Both are timed and shown side by side.

If ``deeppcr.compile`` does not rewrite a loop, the script prints the report's reason instead.
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

PRESETS = {  # train steps, samples, DDPM steps, DDIM steps, timing repeats
    "smoke": (150, 64, 20, 10, 1),
    "quick": (2000, 500, 100, 50, 3),
    "full": (8000, 1000, 1000, 50, 5),
}
TRAIN_TIMESTEPS = 1000
REL_TOL = 1e-4  # max |x - x_seq| / max |x_seq| for the check column


class Denoiser(nn.Module):
    """eps(x, t) for 2-D points; ``t`` is a timestep or a batch of them."""

    def __init__(self, hidden: int = 64, emb: int = 16) -> None:
        super().__init__()
        half = emb // 2
        self.register_buffer("freqs", torch.exp(-math.log(1000.0) * torch.arange(half) / half))
        self.temb = nn.Linear(emb, hidden)
        self.inp = nn.Linear(2, hidden)
        self.mid = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        args = t.to(x.dtype).reshape(-1, 1) * self.freqs
        emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
        h = F.silu(self.inp(x) + self.temb(emb))
        h = F.silu(self.mid(h))
        return self.out(h)


class Sampler(nn.Module):
    """A diffusers sampling loop around the denoiser (plain Python: what deeppcr.compile rewrites)."""

    def __init__(self, denoiser: Denoiser, scheduler, steps: int) -> None:
        super().__init__()
        self.denoiser, self.scheduler = denoiser, scheduler
        scheduler.set_timesteps(steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.scheduler.init_noise_sigma
        for t in self.scheduler.timesteps:
            eps = self.denoiser(self.scheduler.scale_model_input(x, t), t)
            x = self.scheduler.step(eps, t, x).prev_sample
        return x


def moons(n: int, seed: int) -> torch.Tensor:
    from sklearn.datasets import make_moons

    X, _ = make_moons(n_samples=n, noise=0.05, random_state=seed)
    X = (X - X.mean(0)) / X.std(0)
    return torch.tensor(X, dtype=torch.float32)


def train(steps: int, seed: int, batch: int = 256) -> tuple:
    import diffusers

    data = moons(8192, seed)
    torch.manual_seed(seed)
    model = Denoiser()
    noise_sched = diffusers.DDPMScheduler(num_train_timesteps=TRAIN_TIMESTEPS)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    lr = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    losses = []
    for _ in range(steps):
        x0 = data[torch.randint(len(data), (batch,))]
        noise = torch.randn_like(x0)
        t = torch.randint(TRAIN_TIMESTEPS, (batch,))
        loss = F.mse_loss(model(noise_sched.add_noise(x0, noise, t), t), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr.step()
        losses.append(float(loss.detach()))
    return model.eval().requires_grad_(False), data, losses


def solve_module(compiled) -> "deeppcr.PCRSolve":
    return next(m for m in compiled.graph_module.modules() if isinstance(m, deeppcr.PCRSolve))


def run_case(name: str, sampler: Sampler, x: torch.Tensor, repeats: int, seed: int) -> dict:
    compiled = deeppcr.compile(sampler, policy="always")
    t0 = time.perf_counter()
    with torch.no_grad():
        torch.manual_seed(seed)
        compiled(x)  # specialise (the recording front end runs the plain loop once here)
    compile_s = time.perf_counter() - t0
    report = compiled.report
    print(report)
    print()
    row = {"case": name, "report": report, "compile_s": compile_s}
    with torch.no_grad():
        torch.manual_seed(seed)
        row["seq"] = sampler(x)
    if not report.rewritten:
        why = report.failure_detail or "; ".join(f"{c.reason.value}: {c.detail}" for c in report.refused) or \
            "no chain found"
        print(f"{name}: NOT compiled, so no parallel timing: {why}")
        row["why"] = why
        return row

    def seeded(model):
        def run():
            torch.manual_seed(seed)  # the same noise for the stochastic sampler
            return model(x)
        return run

    with torch.no_grad():
        # correctness: a cold solve on x (the compile call's input), then a warm-started one on other noise
        _common.reset_warm_starts(compiled)
        row["par"] = seeded(compiled)()
        x2 = torch.randn_like(x)
        torch.manual_seed(seed + 1)
        seq2 = sampler(x2)
        torch.manual_seed(seed + 1)
        row["warm_err"] = float((compiled(x2) - seq2).abs().max() / seq2.abs().max())
        pcr = solve_module(compiled)
        row["L"], row["period"] = pcr.length, pcr.period

        # timing: fresh noise for every call (drawn untimed; DDPM's per-step noise is fresh too: the RNG is
        # not reseeded); "cold" forgets the previous solution first (it runs right after "deeppcr")
        stats: dict = {"deeppcr": [], "cold": []}

        def setup(name: str) -> torch.Tensor:
            if name == "cold":
                _common.reset_warm_starts(compiled)
            return torch.randn_like(x)

        def after(name: str) -> None:
            if name in stats:
                stats[name].append(solve_module(compiled).last_stats)

        row["times"] = _common.time_alternating({"sequential": sampler, "deeppcr": compiled, "cold": compiled},
                                                repeats, setup, after)
    if any(st.warm_start for st in stats["cold"]):
        raise SystemExit("a cold call started from a previous solution: the cold timings would be warm")
    row["stats"], row["warm_stats"] = stats["cold"][-1], stats["deeppcr"]
    row["cold_its"] = [st.iterations for st in stats["cold"]]
    return row


def plot(cases: list, data: torch.Tensor, path: str, header: str) -> None:
    plt = _common.pyplot()
    if plt is None:
        return
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(len(cases), 3, figsize=(13, 4 * len(cases)), constrained_layout=True, squeeze=False)
    for row_axes, case in zip(axes, cases):
        for ax, key, label in zip(row_axes[:2], ("seq", "par"), ("sequential loop", "deeppcr.compile")):
            ax.scatter(data[:2000, 0], data[:2000, 1], s=2, color="0.85", label="training data")
            if key in case:
                s = case[key]
                ax.scatter(s[:, 0], s[:, 1], s=4, color="C0" if key == "seq" else "C1", label=label)
            else:
                ax.text(0.5, 0.5, "not compiled:\n" + case["why"][:80], transform=ax.transAxes, ha="center", wrap=True)
            ax.set_title(f"{case['case']}: {label}")
            ax.set_xlim(-3, 3)
            ax.set_ylim(-3, 3)
            ax.set_aspect("equal")
            ax.legend(loc="lower left", fontsize=8, markerscale=3)
        ax = row_axes[2]
        if "stats" in case:
            res = case["stats"].residuals
            ax.semilogy(range(1, len(res) + 1), [max(r, 1e-3) for r in res], "o-")
            ax.axhline(1.0, color="k", ls="--", lw=0.8, label="tolerance")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("Newton iteration")
            ax.set_ylabel("max residual / tolerance (floored at 1e-3)")
            ax.set_title(f"{case['case']}: convergence of a cold solve, L={case['L']} steps")
            ax.legend()
        else:
            ax.axis("off")
    fig.suptitle(header, fontsize=9)
    _common.save(fig, path)


def main(argv=None) -> int:
    p = _common.parser(__doc__.splitlines()[0], "diffusion_sampling.png")
    p.add_argument("--train-steps", type=int, default=None)
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--ddpm-steps", type=int, default=None)
    p.add_argument("--ddim-steps", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    args = p.parse_args(argv)
    train_steps, n, ddpm_steps, ddim_steps, repeats = PRESETS[_common.mode_name(args)]
    train_steps, n = args.train_steps or train_steps, args.samples or n
    ddpm_steps, ddim_steps = args.ddpm_steps or ddpm_steps, args.ddim_steps or ddim_steps
    repeats = args.repeats or repeats
    _common.setup(args, f"Diffusion sampling on make_moons: DDPM ({ddpm_steps} steps) and DDIM ({ddim_steps} steps), "
                        "sequential vs deeppcr.compile")
    try:
        import diffusers
    except ImportError:
        print("diffusers is not installed: this example needs it (pip install 'diffusers>=0.27', "
              "or pip install -e '.[examples]')")
        return 2

    t0 = time.perf_counter()
    denoiser, data, losses = train(train_steps, args.seed)
    print(f"trained the denoiser: {train_steps} Adam steps in {time.perf_counter() - t0:.1f} s, "
          f"loss {sum(losses[:50]) / len(losses[:50]):.3f} -> {sum(losses[-50:]) / len(losses[-50:]):.3f}\n")

    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(args.seed + 1))
    common = dict(num_train_timesteps=TRAIN_TIMESTEPS, clip_sample=False)  # the data is not in [-1, 1]
    cases = [
        run_case(f"DDPM {ddpm_steps}", Sampler(denoiser, diffusers.DDPMScheduler(**common), ddpm_steps), x, repeats,
                 args.seed + 2),
        run_case(f"DDIM {ddim_steps}", Sampler(denoiser, diffusers.DDIMScheduler(**common), ddim_steps), x, repeats,
                 args.seed + 2),
    ]

    rows, failed = [], 0
    for c in cases:
        if "par" not in c:
            rows.append({"sampler": c["case"], "samples": n, "chain L": "-", "Newton it warm/cold": "-",
                         "max|x-x_seq|": "-", "check": "-", "seq ms": "-", "deeppcr ms": "-", "cold ms": "-",
                         "speed-up (cold)": "-", "compile s": f"{c['compile_s']:.1f}",
                         "note": "not compiled: " + c["why"][:60]})
            continue
        st, t = c["stats"], c["times"]
        timed = [st, *c["warm_stats"]]
        unconverged = [s for s in timed if not s.converged]
        finish = "converged" if not unconverged else \
            f"{len(unconverged)}/{len(timed)} sequential finish (from {unconverged[0].forward.sequential_from})"
        err = float((c["par"] - c["seq"]).abs().max())
        rel = max(err / float(c["seq"].abs().max()), c["warm_err"])
        failed += rel > REL_TOL
        warm = max(c["warm_stats"], key=lambda s: (s.iterations, s.forward.prefix))
        rows.append({"sampler": c["case"], "samples": n, "chain L": c["L"],
                     "Newton it warm/cold": f"{_common.newton_its(warm)} / {max(c['cold_its'])}",
                     "max|x-x_seq|": f"{err:.1e}", "check": "OK" if rel <= REL_TOL else "MISMATCH",
                     "seq ms": _common.ms(t["sequential"]), "deeppcr ms": _common.ms(t["deeppcr"]),
                     "cold ms": _common.ms(t["cold"]),
                     "speed-up (cold)": f"{_common.ratio(t['sequential'], t['deeppcr'])} "
                                        f"({_common.ratio(t['sequential'], t['cold'])})",
                     "compile s": f"{c['compile_s']:.1f}", "note": finish})
    print(_common.table(rows, "summary (speed-up = sequential ms / deeppcr ms, fresh noise every call; deeppcr "
                              "starts each solve from the previous call's solution (warm start), cold from the "
                              "noise; Newton it: the most any timed call took, +Nseq: steps run sequentially to "
                              "meet the warm start's guess; < 1x means DeepPCR was slower here)"))
    for c in cases:
        if "stats" in c:
            print(f"{c['case']} residual / tolerance per Newton iteration (the last cold solve): "
                  + ", ".join(f"{r:.2g}" for r in c["stats"].residuals))
    print(f"check: compiled samples (cold, and warm-started on other noise) within {REL_TOL:g} (relative) of the "
          "sequential ones: "
          + ("OK" if not failed else f"{failed} MISMATCH(ES)"))
    if args.png != "none":
        plot(cases, data, args.png, f"make_moons, {n} samples, float32, cpu, {torch.get_num_threads()} thread(s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
