"""The PyTorch side of ``benchmarks/peers.py``: the models, the step functions for ``deeppcr.solve``,
and a ``Problem`` (model, weights, inputs, the float64 reference)."""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn
from suite import TanhMLP  # the benchmark suite's model: the same problems

INPUTS = 6  # distinct inputs cycled through the timed calls; inputs[INPUTS] is the check input


class GRU(nn.Module):
    """A GRU cell over time: ``h_t = GRUCell(x_t, h_{t-1})``; returns h_T."""

    def __init__(self, T: int, n: int) -> None:
        super().__init__()
        self.T = T
        self.cell = nn.GRUCell(n, n)

    def forward(self, h, xs):
        for t in range(self.T):
            h = self.cell(xs[t], h)
        return h


def mlp_step(z, W, b):
    return torch.tanh(torch.nn.functional.linear(z, W, b))


def gru_step(h, x, w_ih, w_hh, b_ih, b_hh):
    """``torch.gru_cell`` in plain ops: vmap has no batching rule for ``aten::gru_cell`` (a per-step
    fallback loop, ~150x slower solves), so the solve and compiled variants use this form."""
    i_r, i_z, i_n = torch.nn.functional.linear(x, w_ih, b_ih).chunk(3, -1)
    h_r, h_z, h_n = torch.nn.functional.linear(h, w_hh, b_hh).chunk(3, -1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return n + z * (h - n)


class GRUPlainOps(nn.Module):
    """The same GRU (the same Parameter objects) with the cell written as ``gru_step``."""

    def __init__(self, gru: GRU) -> None:
        super().__init__()
        self.T, self.cell = gru.T, gru.cell

    def forward(self, h, xs):
        c = self.cell
        for t in range(self.T):
            h = gru_step(h, xs[t], c.weight_ih, c.weight_hh, c.bias_ih, c.bias_hh)
        return h


class Problem:
    """One model and input shape; ``inputs[i]`` = (x0, per-step inputs...) as torch tensors."""

    def __init__(self, kind: str, L: int, n: int, B: int) -> None:
        self.kind, self.L, self.n, self.B = kind, L, n, B
        torch.manual_seed(0)
        if kind == "mlp":
            self.model = TanhMLP(L, n)
            self.inputs = [(torch.randn(B, n),) for _ in range(INPUTS + 1)]
        else:
            self.model = GRU(L, n)
            self.inputs = [(torch.randn(B, n), torch.randn(L, B, n)) for _ in range(INPUTS + 1)]
        self.model64 = copy.deepcopy(self.model).double()
        self.compiled = None  # deeppcr.compile of the model, shared by the compile_* variants
        self.params = dict(problem="tanh-mlp" if kind == "mlp" else "gru", L=L, n=n, B=B)

    def weights(self):
        """(per-step tensors, shared tensors) of the model, detached float32 copies."""
        if self.kind == "mlp":
            W = torch.stack([la.weight.detach() for la in self.model.layers]).clone()
            b = torch.stack([la.bias.detach() for la in self.model.layers]).clone()
            return (W, b), ()
        c = self.model.cell
        return (), tuple(p.detach().clone() for p in (c.weight_ih, c.weight_hh, c.bias_ih, c.bias_hh))

    def model_grads(self, model, x):
        if self.kind == "mlp":
            return [x.grad] + [la.weight.grad for la in model.layers] + [la.bias.grad for la in model.layers]
        c = model.cell
        return [x.grad] + [c.weight_ih.grad, c.weight_hh.grad, c.bias_ih.grad, c.bias_hh.grad]

    def reference(self, train: bool) -> np.ndarray:
        """The float64 sequential answer on the check input (``inputs[-1]``)."""
        inp = [t.double().clone() for t in self.inputs[-1]]
        if not train:
            with torch.no_grad():
                return _flat([self.model64(*inp)])
        self.model64.zero_grad(set_to_none=True)
        inp[0].requires_grad_()
        self.model64(*inp).sum().backward()
        return _flat(self.model_grads(self.model64, inp[0]))


def _flat(ts) -> np.ndarray:
    return np.concatenate([np.asarray(t.detach().double().reshape(-1) if isinstance(t, torch.Tensor) else t,
                                      dtype=np.float64).reshape(-1) for t in ts])


def _priority(p):
    """Issue 14's target rows first (a run that hits --minutes loses the least useful rows):
    L=4096 w=4 B=1; L=16384 w<=4 B=1; GRU T>=10000; the other L>=4096 rows; then the rest."""
    kind, L, n, B, _ = p
    if kind == "mlp" and (L, n, B) == (4096, 4, 1):
        return 0
    if kind == "mlp" and L >= 16384 and n <= 4 and B == 1:
        return 1
    if kind == "gru" and L >= 10000:
        return 2
    if kind == "mlp" and L >= 4096 and not (n >= 16 and B >= 16):
        return 3
    return 4 if kind == "gru" or L < 4096 else 5


def problems(args):
    """The (kind, L, n, B, modes) rows the command line asks for, the issue's target rows first."""
    out = []
    if not args.no_mlp:
        for L in args.L:
            for w in args.w:
                for B in args.B:
                    if (L, w, B) == (16384, 16, 16) and not args.all:
                        continue  # full-mode Jacobians of 2^26 elements: minutes per call (--all runs it)
                    out.append(("mlp", L, w, B, args.modes))
    if not args.no_gru:
        for T in args.T:
            for n in args.n:
                out.append(("gru", T, n, 1, ["forward"]))
    return sorted(out, key=_priority)
