"""Small models for the compiler tests: each builder returns (model, example_inputs, expected chains).

``expected`` is a list of ``(L, period)`` for the chains the compiler must rewrite, in graph order.
Widths are small so full Jacobians stay cheap; everything runs in a few milliseconds on a CPU.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def mlp(L=12, w=8, dtype=torch.float64):
    layers = []
    for _ in range(L):
        layers += [nn.Linear(w, w), nn.Tanh()]
    return nn.Sequential(*layers).to(dtype), (torch.randn(3, w, dtype=dtype),), [(L, 2)]


class ModuleListNet(nn.Module):
    def __init__(self, L, w):
        super().__init__()
        self.inp = nn.Linear(4, w)
        self.layers = nn.ModuleList(nn.Linear(w, w) for _ in range(L))
        self.out = nn.Linear(w, 2)

    def forward(self, x):
        x = self.inp(x)
        for layer in self.layers:
            x = F.gelu(layer(x))
        return self.out(x)


def module_list(L=10, w=8, dtype=torch.float64):
    return ModuleListNet(L, w).to(dtype), (torch.randn(3, 4, dtype=dtype),), [(L, 2)]


class Residual(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.a, self.b = nn.Linear(w, w), nn.Linear(w, w)

    def forward(self, x):
        return x + 0.5 * self.b(torch.tanh(self.a(x)))


class Stack(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def residual(L=16, w=8, dtype=torch.float64):
    return Stack([Residual(w) for _ in range(L)]).to(dtype), (torch.randn(4, w, dtype=dtype),), [(L, 1)]


class NormBlock(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.norm, self.lin = nn.LayerNorm(w), nn.Linear(w, w)

    def forward(self, x):
        return x + torch.tanh(self.lin(self.norm(x)))


def layernorm(L=10, w=8, dtype=torch.float64):
    return Stack([NormBlock(w) for _ in range(L)]).to(dtype), (torch.randn(3, w, dtype=dtype),), [(L, 1)]


class ConvBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm, self.conv = nn.GroupNorm(2, c), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + 0.3 * self.conv(F.silu(self.norm(x)))


def conv(L=8, c=4, dtype=torch.float64):
    return Stack([ConvBlock(c) for _ in range(L)]).to(dtype), (torch.randn(2, c, 4, 4, dtype=dtype),), [(L, 1)]


class Attention(nn.Module):
    def __init__(self, d, heads=2):
        super().__init__()
        self.heads, self.norm = heads, nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        q, k, v = (t.reshape(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / (D // self.heads) ** 0.5, dim=-1)
        return x + self.proj((att @ v).transpose(1, 2).reshape(B, T, D))


class MLPBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


def attention(L=8, d=8, dtype=torch.float64):
    return Stack([Attention(d) for _ in range(L)]).to(dtype), (torch.randn(2, 3, d, dtype=dtype),), [(L, 1)]


class TransformerLayer(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attn, self.mlp = Attention(d), MLPBlock(d)

    def forward(self, x):
        return self.mlp(self.attn(x))


def transformer(L=8, d=8, dtype=torch.float64):
    return Stack([TransformerLayer(d) for _ in range(L)]).to(dtype), (torch.randn(2, 3, d, dtype=dtype),), [(L, 2)]


class CondBlock(nn.Module):
    def __init__(self, w, c):
        super().__init__()
        self.lin, self.film = nn.Linear(w, w), nn.Linear(c, w)

    def forward(self, x, cond):
        return x + 0.5 * torch.tanh(self.lin(x) * cond.mean(-1, keepdim=True) + self.film(cond))


class CondNet(nn.Module):
    def __init__(self, L, w, c):
        super().__init__()
        self.blocks = nn.ModuleList(CondBlock(w, c) for _ in range(L))

    def forward(self, x, cond):
        for b in self.blocks:
            x = b(x, cond)
        return x


def conditioning(L=10, w=8, c=3, dtype=torch.float64):
    return CondNet(L, w, c).to(dtype), (torch.randn(3, w, dtype=dtype), torch.randn(3, c, dtype=dtype)), [(L, 1)]


class TwoChains(nn.Module):
    """Two chains separated by a different layer (a LayerNorm): two chains, not one."""

    def __init__(self, L1, L2, w):
        super().__init__()
        self.first = nn.ModuleList(Residual(w) for _ in range(L1))
        self.mid = nn.LayerNorm(w)
        self.second = nn.ModuleList(NormBlock(w) for _ in range(L2))

    def forward(self, x):
        for b in self.first:
            x = b(x)
        x = self.mid(x)
        for b in self.second:
            x = b(x)
        return x


def two_chains(L1=9, L2=8, w=8, dtype=torch.float64):
    return TwoChains(L1, L2, w).to(dtype), (torch.randn(3, w, dtype=dtype),), [(L1, 1), (L2, 1)]


class Interrupted(nn.Module):
    """One stack of identical blocks interrupted by a different layer in the middle."""

    def __init__(self, L, w):
        super().__init__()
        self.blocks = nn.ModuleList(Residual(w) for _ in range(2 * L))
        self.odd = nn.Linear(w, w)
        self.L = L

    def forward(self, x):
        for i, b in enumerate(self.blocks):
            if i == self.L:
                x = torch.sigmoid(self.odd(x))
            x = b(x)
        return x


def interrupted(L=8, w=8, dtype=torch.float64):
    return Interrupted(L, w).to(dtype), (torch.randn(3, w, dtype=dtype),), [(L, 1), (L, 1)]


class SharedWeights(nn.Module):
    def __init__(self, L, w):
        super().__init__()
        self.block, self.L = Residual(w), L

    def forward(self, x):
        for _ in range(self.L):
            x = self.block(x)
        return x


def shared_weights(L=12, w=8, dtype=torch.float64):
    return SharedWeights(L, w).to(dtype), (torch.randn(3, w, dtype=dtype),), [(L, 1)]


ZOO = {
    "mlp": mlp, "module_list": module_list, "residual": residual, "layernorm": layernorm, "conv": conv,
    "attention": attention, "transformer": transformer, "conditioning": conditioning,
    "two_chains": two_chains, "interrupted": interrupted, "shared_weights": shared_weights,
}
