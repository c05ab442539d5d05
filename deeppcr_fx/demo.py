"""``python -m deeppcr_fx demo``: compile two built-in models, check them, time them.

1. A deep tanh MLP (an ``nn.Sequential`` of L ``Linear(4, 4)`` + ``Tanh`` layers):
   compiled, checked against the plain model (outputs and parameter gradients), and timed
   (forward, forward + backward).
2. A small DDIM-style sampler: the same denoiser called at every step of a sampling loop
   written in plain Python, compiled, checked and timed.

No optional extras are needed. Timings are medians of alternating runs in this process.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch
import torch.nn as nn

from .api import compile as deeppcr_compile


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


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _compare(name: str, model: nn.Module, x: torch.Tensor, repeats: int, backward: bool) -> dict:
    compiled = deeppcr_compile(model, policy="always")
    y_ref, y = model(x), compiled(x)
    print(compiled.report)
    err = float((y - y_ref).detach().abs().max())
    row = {"model": name, "max |y - y_plain|": f"{err:.2e}"}
    if backward:
        params = list(model.parameters())
        g_ref = torch.autograd.grad(model(x).sum(), params)
        g = torch.autograd.grad(compiled(x).sum(), params)
        row["max |grad - grad_plain|"] = f"{max(float((a - b).abs().max()) for a, b in zip(g, g_ref)):.2e}"
    with torch.no_grad():
        fwd = {k: _median_time(lambda m=m: m(x), repeats) for k, m in (("plain", model), ("compiled", compiled))}
    row["forward ms (plain / deeppcr)"] = f"{1e3 * fwd['plain']:.1f} / {1e3 * fwd['compiled']:.1f}"
    row["forward speed-up"] = f"{fwd['plain'] / fwd['compiled']:.2f}x"
    if backward:
        fb = {k: _median_time(lambda m=m: m(x).sum().backward(), repeats)
              for k, m in (("plain", model), ("compiled", compiled))}
        model.zero_grad(set_to_none=True)
        row["fwd+bwd ms (plain / deeppcr)"] = f"{1e3 * fb['plain']:.1f} / {1e3 * fb['compiled']:.1f}"
        row["fwd+bwd speed-up"] = f"{fb['plain'] / fb['compiled']:.2f}x"
    return row


def main(quick: bool = False) -> int:
    torch.manual_seed(0)
    depth, repeats = (256, 3) if quick else (2048, 5)
    print(f"deeppcr_fx demo: a {depth}-layer tanh MLP and a 50-step DDIM sampler (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)\n")
    rows = [_compare(f"MLP L={depth} w=4", deep_mlp(depth), torch.randn(1, 4), repeats, backward=True)]
    print()
    rows.append(_compare("DDIM 50 steps", DDIMSampler(), torch.randn(16, 2), repeats, backward=False))
    print("\nsummary")
    for row in rows:
        print("  " + "  ".join(f"{k}: {v}" for k, v in row.items()))
    return 0
