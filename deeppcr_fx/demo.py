"""``python -m deeppcr_fx demo``: compile two built-in models, check them, time them.

1. A deep tanh MLP (an ``nn.Sequential`` of L ``Linear(4, 4)`` + ``Tanh`` layers): compiled,
   checked against the plain model (outputs and parameter gradients), and timed: forward
   (under ``no_grad``), backward alone (after an untimed forward), forward + backward.
2. A small DDIM-style sampler: the same denoiser called at every step of a 50-step sampling
   loop written in plain Python, compiled, checked and timed (forward).

No optional extras are needed. Timings are medians of alternating runs in this process,
with one intra-op thread unless ``threads`` says otherwise (stable when other jobs share
the CPU). Speed-up = plain time / compiled time; below 1x the compiled model was slower.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Optional

import torch
import torch.nn as nn

from .api import compile as deeppcr_compile
from .runtime.pcr_solve import PCRSolve


def deep_mlp(depth: int = 64, width: int = 4, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers)


class Denoiser(nn.Module):
    """eps(x, t): a small MLP with a sinusoidal timestep embedding."""

    def __init__(self, width: int = 2, hidden: int = 16, emb: int = 8) -> None:
        super().__init__()
        half = emb // 2
        self.register_buffer("freqs", torch.exp(-math.log(1000.0) * torch.arange(half) / half))
        self.temb = nn.Linear(emb, hidden)
        self.inp = nn.Linear(width, hidden)
        self.out = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        args = t.reshape(1) * self.freqs
        emb = torch.cat([torch.sin(args), torch.cos(args)]).unsqueeze(0)
        return self.out(torch.tanh(self.inp(x) + self.temb(emb)))


class DDIMSampler(nn.Module):
    """Deterministic DDIM sampling (eta = 0) over ``steps`` timesteps of a linear beta schedule."""

    def __init__(self, steps: int = 50, train_steps: int = 1000, width: int = 2, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.denoiser = Denoiser(width)
        betas = torch.linspace(1e-4, 0.02, train_steps)
        self.alphas_cumprod = torch.cumprod(1 - betas, 0).tolist()
        self.timesteps = list(range(train_steps - 1, -1, -train_steps // steps))[:steps]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, t in enumerate(self.timesteps):
            a_t = self.alphas_cumprod[t]
            a_prev = self.alphas_cumprod[self.timesteps[i + 1]] if i + 1 < len(self.timesteps) else 1.0
            eps = self.denoiser(x, torch.tensor(float(t)))
            x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
            x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
        return x


def _alternating_medians(fns: dict, repeats: int, prepare: Optional[Callable[[str], object]] = None) -> dict:
    """Median seconds per variant, the variants run in turn; ``prepare(name)`` runs untimed before each call
    and its result is the call's argument."""
    times: dict = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            arg = prepare(name) if prepare is not None else None
            t0 = time.perf_counter()
            fn(arg)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _cold_if(name: str, compiled) -> None:
    """Before a "cold" call: forget every chain's previous solution (Newton starts from the input)."""
    if name == "cold" and compiled.graph_module is not None:
        for m in compiled.graph_module.modules():
            if isinstance(m, PCRSolve):
                m.reset_warm_start()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _iterations(compiled) -> str:
    solves = [m for m in compiled.graph_module.modules() if isinstance(m, PCRSolve)] if compiled.graph_module else []
    if not solves or solves[0].last_stats is None:
        return "-"
    st = solves[0].last_stats
    return f"{st.iterations}" + ("" if st.converged else f" (sequential finish: {st.sequential_finish.value})")


def _grads(model, fn, x) -> list:
    """Parameter gradients of ``fn(x).sum()`` by ``backward()``, as a training loop gets them."""
    model.zero_grad(set_to_none=True)
    fn(x).sum().backward()
    grads = [p.grad for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def _compare(name: str, model: nn.Module, x: torch.Tensor, repeats: int, backward: bool, tol: float) -> dict:
    compiled = deeppcr_compile(model, policy="always")
    t0 = time.perf_counter()
    with torch.no_grad():
        compiled(x)  # specialise for inference
    if backward:
        compiled(x)  # and for training (grad mode is part of the signature)
    compile_s = time.perf_counter() - t0
    print(compiled.report)
    row = {"model": name, "compile s": f"{compile_s:.1f}"}
    with torch.no_grad():
        y_ref, y = model(x), compiled(x)
    row["Newton it"] = _iterations(compiled)
    errs = [_rel_err(y, y_ref)]
    row["max |y - y_plain|"] = f"{float((y - y_ref).abs().max()):.1e}"
    if backward:
        g_ref, g = _grads(model, model, x), _grads(model, compiled, x)
        errs.append(max(_rel_err(a, b) for a, b in zip(g, g_ref)))
        row["grad rel err"] = f"{errs[-1]:.1e}"
    row["check"] = "OK" if max(errs) <= tol else f"MISMATCH (> {tol:g})"
    # Honest timing: a fresh input for every timed call (a warm start never meets an exact previous
    # solution), an optimizer step between training calls, the variants in turn; "cold" forgets the
    # previous solution before each call (no warm start at all).
    variants = {"plain": model, "compiled": compiled, "cold": compiled}
    fresh = lambda name: _cold_if(name, compiled) or torch.randn_like(x)  # noqa: E731
    with torch.no_grad():
        fwd = _alternating_medians({k: (lambda xi, m=m: m(xi)) for k, m in variants.items()}, repeats, fresh)
    row["fwd ms plain/deeppcr/cold"] = f"{1e3 * fwd['plain']:.1f} / {1e3 * fwd['compiled']:.1f} / {1e3 * fwd['cold']:.1f}"
    row["fwd speed-up (cold)"] = f"{fwd['plain'] / fwd['compiled']:.2f}x ({fwd['plain'] / fwd['cold']:.2f}x)"
    if backward:
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}

        def prepare(which):  # untimed: the previous call's optimizer step, then a fresh input
            if any(p.grad is not None for p in model.parameters()):
                opt.step()
            model.zero_grad(set_to_none=True)
            return fresh(which)

        step = _alternating_medians({k: (lambda xi, m=m: m(xi).sum().backward()) for k, m in variants.items()},
                                    repeats, prepare)
        model.zero_grad(set_to_none=True)
        model.load_state_dict(state)  # the demo leaves the model as it found it
        row["train step ms plain/deeppcr/cold"] = (f"{1e3 * step['plain']:.1f} / {1e3 * step['compiled']:.1f} / "
                                                   f"{1e3 * step['cold']:.1f}")
        row["train speed-up (cold)"] = f"{step['plain'] / step['compiled']:.2f}x ({step['plain'] / step['cold']:.2f}x)"
    return row


def _print_rows(rows: list) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[str(r.get(k, "-")) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    for vals in [keys, ["-" * w for w in widths], *cells]:
        print("  " + "  ".join(v.rjust(w) for v, w in zip(vals, widths)))


def main(quick: bool = False, threads: Optional[int] = None) -> int:
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads or 1)
    try:
        return _run(quick, threads)
    finally:
        torch.set_num_threads(previous_threads)


def _run(quick: bool, threads: Optional[int]) -> int:
    torch.manual_seed(0)
    depth, repeats = (512, 5) if quick else (2048, 7)
    print(f"deeppcr_fx demo: a {depth}-layer tanh MLP (width 4, batch 1) and a 50-step DDIM sampler "
          f"(16 samples), float32")
    print(f"torch {torch.__version__}, cpu, {torch.get_num_threads()} intra-op thread(s)"
          f"{'' if threads else ' (1 by default: stable timings when other jobs share the CPU)'}; "
          "times are medians of alternating runs\n")
    rows = [_compare(f"MLP L={depth} w=4", deep_mlp(depth), torch.randn(1, 4), repeats, backward=True, tol=1e-4)]
    print()
    rows.append(_compare("DDIM 50 steps", DDIMSampler(), torch.randn(16, 2), repeats, backward=False, tol=1e-4))
    print("\nsummary (speed-up = plain ms / deeppcr ms, a fresh input every call; deeppcr starts each solve from the"
          " previous call's solution (warm start), cold from the input; a training step is forward + backward with an"
          " optimizer step between steps; below 1x the parallel version was slower on this machine; check: relative"
          " error of outputs and gradients <= 1e-4; the max column is absolute)")
    _print_rows(rows)
    print("\nOn a CPU the parallel work of each Newton iteration shares the cores the plain loop uses; DeepPCR's "
          "published speed-ups were measured on GPUs. The backward pass is one parallel scan (no Newton loop). "
          "More: examples/mlp_speed.py, examples/train_deep_resnet.py, examples/diffusion_sampling.py.")
    return 0 if all(r["check"] == "OK" for r in rows) else 1
