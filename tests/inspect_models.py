"""Zero-argument model factories for ``python -m deeppcr_fx explain MODULE:FACTORY`` (tests and docs).

    PYTHONPATH=tests python -m deeppcr_fx explain inspect_models:three_chains --input-shape 2,8 --policy always
    PYTHONPATH=tests python -m deeppcr_fx explain inspect_models:ddim_sampler --input-shape 2,8 --policy always
"""
from __future__ import annotations

import torch
import torch.nn as nn

from compile_zoo import NormBlock, Residual


class ThreeChains(nn.Module):
    """Residual blocks, a LayerNorm, pre-norm blocks, a projection, then a plain tanh MLP: three chains."""

    def __init__(self, w: int = 8):
        super().__init__()
        self.encoder = nn.ModuleList(Residual(w) for _ in range(9))
        self.norm = nn.LayerNorm(w)
        self.blocks = nn.ModuleList(NormBlock(w) for _ in range(8))
        self.proj = nn.Linear(w, w)
        self.head = nn.Sequential(*[m for _ in range(10) for m in (nn.Linear(w, w), nn.Tanh())])

    def forward(self, x):
        for b in self.encoder:
            x = b(x)
        x = self.norm(x)
        for b in self.blocks:
            x = b(x)
        return self.head(torch.sigmoid(self.proj(x)))


def three_chains() -> nn.Module:
    torch.manual_seed(0)
    return ThreeChains(8)


def ddim_sampler() -> nn.Module:
    """A 10-step DDIM sampling loop (diffusers scheduler, a small random denoiser); input shape (B, 8)."""
    from diffusion_zoo import sampler

    return sampler("ddim", steps=10)[0]
