"""Loops whose state is not one tensor, and diffusers samplers, compiled as users write them.

One row per case: the front end ``auto`` chose, chains found / rewritten, L, period (graph pieces per
step), state kind (tensors in the state), the largest relative difference from eager in float64 (output,
and the parameters' gradients), and the time of a call vs eager with a fresh input per call (forward
without grad; medians; eager calls first, then compiled ones). Cases: RNN cells over time with ``h0`` built inside forward
(GRU, LSTM ``(h, c)``), a position/velocity oscillator, and ``tests/diffusion_zoo.Loop`` with each
diffusers scheduler family (tiny MLP denoiser; DPM-Solver++ SDE, DPM-Solver order 3, PNDM and LMS with
``--steps`` + 2 timesteps), plus a tiny ``UNet2DModel`` under DDIM.

    python benchmarks/zoo_states.py [--repeats 9] [--steps 10] [--threads 1] [--cases lstm,dpm_multistep,...]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn as nn

import deeppcr_fx as deeppcr

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


class OverTime(nn.Module):
    def __init__(self, cell: nn.Module, hidden: int, lstm: bool = False):
        super().__init__()
        self.cell, self.hidden, self.lstm = cell, hidden, lstm

    def forward(self, x):
        h = torch.zeros(x.shape[0], self.hidden, dtype=x.dtype)
        c = torch.zeros(x.shape[0], self.hidden, dtype=x.dtype)
        for t in range(x.shape[1]):
            if self.lstm:
                h, c = self.cell(x[:, t], (h, c))
            else:
                h = self.cell(x[:, t], h)
        return h


class Oscillator(nn.Module):
    def __init__(self, w: int = 4, steps: int = 64, dt: float = 0.1):
        super().__init__()
        self.force, self.steps, self.dt = nn.Sequential(nn.Linear(w, w), nn.Tanh(), nn.Linear(w, w)), steps, dt

    def forward(self, x):
        v = torch.zeros_like(x)
        for _ in range(self.steps):
            v = 0.9 * v + self.dt * self.force(x)
            x = x + self.dt * v
        return x


def cases(steps: int) -> dict:
    from diffusion_zoo import SCHEDULERS, Loop, tiny_unet, zoo_loop, zoo_scheduler

    def unet_loop():
        class UNetLoop(Loop):
            def __init__(self):
                nn.Module.__init__(self)
                self.unet, self.scheduler, self.steps = tiny_unet(), zoo_scheduler("ddim"), steps

            def forward(self, x):
                self.scheduler.set_timesteps(self.steps)
                for t in self.scheduler.timesteps:
                    x = self.scheduler.step(self.unet(x, t).sample, t, x).prev_sample
                return x

        return UNetLoop(), lambda: torch.randn(1, 1, 4, 4, dtype=torch.float64)

    torch.manual_seed(0)
    out = {
        "gru": lambda: (OverTime(nn.GRUCell(3, 4), 4).double(), lambda: torch.randn(2, 100, 3, dtype=torch.float64)),
        "lstm": lambda: (OverTime(nn.LSTMCell(3, 4), 4, lstm=True).double(),
                         lambda: torch.randn(2, 100, 3, dtype=torch.float64)),
        "oscillator": lambda: (Oscillator().double(), lambda: torch.randn(3, 4, dtype=torch.float64)),
    }
    for kind in SCHEDULERS:
        out[kind] = (lambda k: lambda: (zoo_loop(k, steps=steps), lambda: torch.randn(2, 8, dtype=torch.float64)))(kind)
    import diffusers

    more = {"dpm_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
            "dpm_order3": ("DPMSolverMultistepScheduler", {"solver_order": 3}),
            "pndm": ("PNDMScheduler", {}), "lms": ("LMSDiscreteScheduler", {})}
    for kind, (name, options) in more.items():
        out[kind] = (lambda n, o: lambda: (Loop(getattr(diffusers, n)(num_train_timesteps=1000, **o), steps + 2).double(),
                                            lambda: torch.randn(2, 8, dtype=torch.float64)))(name, options)
    out["unet_ddim"] = unet_loop
    return out


def row(name: str, build, repeats: int) -> str:
    model, fresh = build()
    x = fresh()
    compiled = deeppcr.compile(model, policy="always", min_length=4)
    compiled(x)  # specialise
    torch.manual_seed(1)
    out = compiled(x)
    torch.manual_seed(1)
    ref = model(x)
    err = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(2)
    g_out = torch.autograd.grad(compiled(x).sum(), params)
    torch.manual_seed(2)
    g_ref = torch.autograd.grad(model(x).sum(), params)
    g_err = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(g_out, g_ref))
    eager, parallel = [], []
    with torch.no_grad():
        # not interleaved: an eager call re-runs set_timesteps, whose new tensors fail the compiled loop's
        # guard on the scheduler (reads.py) and make the next compiled call specialise again
        for fn, times in ((model, eager), (compiled, parallel)):
            fn(x)
            for _ in range(repeats):
                inp = fresh()
                t0 = time.perf_counter()
                fn(inp)
                times.append(time.perf_counter() - t0)
    report = compiled.report
    rewritten = report.rewritten
    main = rewritten[0] if rewritten else (report.chains[0] if report.chains else None)
    kind = "-" if main is None else (f"tuple of {main.state.count(',') + 1}" if main.state.startswith("(") else "tensor")
    te, tp = statistics.median(eager), statistics.median(parallel)
    return (f"| {name} | {report.front_end} | {len(report.chains)}/{len(rewritten)} | {main.length if main else '-'} | "
            f"{main.period if main else '-'} | {kind} | {err:.1e} / {g_err:.1e} | {te * 1e3:.1f} ms | {tp * 1e3:.1f} ms | "
            f"{te / tp:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cases", default="")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steady timings on a shared CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    table = cases(args.steps)
    chosen = args.cases.split(",") if args.cases else list(table)
    print(f"load {os.getloadavg()[0]:.1f}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("| case | front end | chains found/rewritten | L | period | state | rel. error out / grads | eager | "
          "compiled | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in chosen:
        try:
            print(row(name, table[name], args.repeats), flush=True)
        except Exception as exc:  # a row that fails says so; the others still run
            print(f"| {name} | error: {type(exc).__name__}: {str(exc).splitlines()[0][:120]} |", flush=True)


if __name__ == "__main__":
    main()
