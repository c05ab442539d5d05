"""Small chain problems shared by the runtime tests: each knows its sequential answer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class Chain:
    name: str
    step: Callable
    x0: object
    per_step: tuple
    shared: tuple = ()

    @property
    def length(self) -> int:
        return self.per_step[0].shape[0]

    def sequential(self, x0=None, per_step=None, shared=None):
        """z_1..z_L by the plain loop (autograd-able)."""
        z = self.x0 if x0 is None else x0
        per_step = self.per_step if per_step is None else per_step
        shared = self.shared if shared is None else shared
        out = []
        for l in range(self.length):
            z = self.step(z, *(p[l] for p in per_step), *shared)
            out.append(z)
        if isinstance(z, tuple):
            return tuple(torch.stack([o[i] for o in out]) for i in range(len(z)))
        return torch.stack(out)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def mlp(act, L, w=4, B=2, gain=0.9, dtype=torch.float64, seed=0) -> Chain:
    g = _gen(seed)
    W = (torch.randn(L, w, w, generator=g) * gain / w ** 0.5).to(dtype)
    b = (torch.randn(L, w, generator=g) * 0.1).to(dtype)
    x0 = torch.randn(B, w, generator=g).to(dtype)
    fn = {"tanh": torch.tanh, "relu": F.relu, "gelu": F.gelu}[act]
    return Chain(f"{act}-mlp", lambda z, W, b: fn(F.linear(z, W, b)), x0, (W, b))


def residual(L, w=4, B=2, dtype=torch.float64, seed=1) -> Chain:
    g = _gen(seed)
    W = (torch.randn(L, w, w, generator=g) / w ** 0.5).to(dtype)
    b = (torch.randn(L, w, generator=g) * 0.1).to(dtype)
    x0 = torch.randn(B, w, generator=g).to(dtype)
    return Chain("residual", lambda z, W, b: z + 0.2 * torch.tanh(F.linear(z, W, b)), x0, (W, b))


def ddim_like(L, w=4, B=3, dtype=torch.float64, seed=2) -> Chain:
    """Shared-weight denoiser, per-step schedule constants and time embeddings."""
    g = _gen(seed)
    Wd = (torch.randn(w, w, generator=g) / w ** 0.5).to(dtype)
    alpha = torch.linspace(0.9, 0.99, L).to(dtype)
    sigma = torch.linspace(0.1, 0.01, L).to(dtype)
    temb = (torch.randn(L, w, generator=g) * 0.1).to(dtype)
    x0 = torch.randn(B, w, generator=g).to(dtype)

    def step(z, a, s, e, Wd):
        eps = torch.tanh(z @ Wd + e)
        return a * z - s * eps

    return Chain("ddim-like", step, x0, (alpha, sigma, temb), (Wd,))


def tuple_state(L, w=3, B=2, dtype=torch.float64, seed=3) -> Chain:
    """An LSTM-like cell: the state is (h, c)."""
    g = _gen(seed)
    W = (torch.randn(L, 4 * w, w, generator=g) * 0.5 / w ** 0.5).to(dtype)
    b = (torch.randn(L, 4 * w, generator=g) * 0.1).to(dtype)
    x0 = (torch.randn(B, w, generator=g).to(dtype), torch.randn(B, w, generator=g).to(dtype))

    def step(hc, W, b):
        h, c = hc
        i, f, o, u = F.linear(h, W, b).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(u)
        return (torch.sigmoid(o) * torch.tanh(c), c)

    return Chain("tuple-lstm", step, x0, (W, b))


PROBLEMS = {
    "tanh": lambda L, **kw: mlp("tanh", L, **kw),
    "relu": lambda L, **kw: mlp("relu", L, **kw),
    "gelu": lambda L, **kw: mlp("gelu", L, **kw),
    "residual": residual,
    "ddim": ddim_like,
    "tuple": tuple_state,
}
