"""Backward (and forward) time of deeppcr.solve vs autograd through the sequential nn.ModuleList model.

    python benchmarks/backward_vs_autograd.py [--L 4096] [--w 4] [--B 1] [--repeats 7] [--device cpu] [--threads 1]

Three variants of one tanh MLP (L Linear(w, w) layers), same weights:
- ``sequential``: the nn.ModuleList model, run and differentiated by plain autograd;
- ``solve``: ``deeppcr.solve`` (jacobian="full") on the weights stacked once into leaf
  tensors W (L, w, w) and b (L, w): the runtime on its own;
- ``solve+stack``: the same, stacking the layers' Parameters inside the forward so the
  gradients land in the 2L original Parameters through autograd (one leaf each);
- ``compiled``: ``deeppcr.compile(model, policy="always")`` of the nn.ModuleList model, with its
  defaults (flat parameters, direct gradients, warm starts: each solve starts from the previous
  call's solution, another input's under the previous step's weights);
- ``compiled-cold``: the same with ``warm_start=False`` (every solve starts from the input);
- ``compiled-autograd``: ``compiled`` with ``direct_grads=False``: the Parameters stacked by
  ``torch.stack`` per call, their gradients accumulated by autograd, one leaf each;
- ``compiled-unconnected``: ``compiled`` with its Parameters left out of the autograd graph
  (``StackedAttributes.connect = False``, the default before issue 12): the cost of keeping
  ``torch.autograd.grad(loss, params)`` and ``backward(inputs=...)`` correct is
  ``compiled`` minus this.

Gradients are compared with the sequential model's before timing. Every timing is a median
over alternating runs in this process (the order shuffled each round, the garbage collector off
while timing, as in ``timeit``); ``ratio_*`` columns are medians of each round's ratio to ``compiled``. Between calls, untimed, as in training: an optimizer step
(Adam, lr 1e-4, on every variant's parameters), ``.grad`` reset to None (as
``optimizer.zero_grad()`` does) and a fresh random input, so no call sees the input or the
weights of an earlier one.
"""
from __future__ import annotations

import argparse
import csv
import gc
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import deeppcr_fx as deeppcr


def _step(z, W, b):
    return torch.tanh(F.linear(z, W, b))


class _MLP(torch.nn.Module):
    def __init__(self, layers: torch.nn.ModuleList) -> None:
        super().__init__()
        self.layers = layers

    def forward(self, x):
        for m in self.layers:
            x = torch.tanh(m(x))
        return x


class Variants:
    def __init__(self, L: int, w: int, B: int, device: str, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(w, w) for _ in range(L)]).to(device)
        self.x = torch.randn(B, w, device=device)
        self.model = _MLP(self.layers)
        self.compiled_model = deeppcr.compile(self.model, policy="always")
        self.compiled_model(self.x)  # compile (untimed)
        self.cold_model = deeppcr.compile(self.model, policy="always", warm_start=False)
        self.cold_model(self.x)
        self.autograd_model = deeppcr.compile(self.model, policy="always", direct_grads=False)
        self.autograd_model(self.x)
        self.unconnected_model = deeppcr.compile(self.model, policy="always")
        self.unconnected_model(self.x)
        for m in self.unconnected_model.graph_module.modules():
            if hasattr(m, "connect"):  # StackedAttributes
                m.connect = False
        self.W = torch.stack([m.weight for m in self.layers]).detach().requires_grad_()
        self.b = torch.stack([m.bias for m in self.layers]).detach().requires_grad_()
        self.opt = torch.optim.Adam([*self.layers.parameters(), self.W, self.b], lr=1e-4)
        self.stats = None

    def next_step(self) -> None:
        """Untimed, between calls: the optimizer step on the last call's gradients, zero_grad, a fresh input."""
        if any(p.grad is not None for p in [*self.layers.parameters(), self.W, self.b]):
            self.opt.step()
        self.zero_grad()
        self.x = torch.randn_like(self.x)

    def sequential(self):
        z = self.x
        for m in self.layers:
            z = torch.tanh(m(z))
        return z

    def solve(self):
        res = deeppcr.solve(_step, self.x, per_step=(self.W, self.b), jacobian="full")
        self.stats = res.stats
        return res.states[-1]

    def compiled(self):
        return self.compiled_model(self.x)

    def compiled_cold(self):
        return self.cold_model(self.x)

    def compiled_autograd(self):
        return self.autograd_model(self.x)

    def compiled_unconnected(self):
        return self.unconnected_model(self.x)

    def solve_stack(self):
        W = torch.stack([m.weight for m in self.layers])
        b = torch.stack([m.bias for m in self.layers])
        return deeppcr.solve(_step, self.x, per_step=(W, b), jacobian="full").states[-1]

    def zero_grad(self):
        for p in [*self.layers.parameters(), self.W, self.b]:
            p.grad = None


def run(L: int, w: int, B: int, repeats: int, device: str = "cpu") -> dict:
    v = Variants(L, w, B, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fns = {"sequential": v.sequential, "solve": v.solve, "solve+stack": v.solve_stack, "compiled": v.compiled,
           "compiled-cold": v.compiled_cold, "compiled-autograd": v.compiled_autograd,
           "compiled-unconnected": v.compiled_unconnected}

    # correctness first: outputs and gradients against the sequential model
    v.zero_grad()
    v.sequential().sum().backward()
    g_seq = torch.stack([m.weight.grad for m in v.layers])
    y_seq = v.sequential().detach()
    v.zero_grad()
    y_par = v.solve()
    y_par.sum().backward()
    max_err = float((y_par.detach() - y_seq).abs().max())
    max_grad_err = float((v.W.grad - g_seq).abs().max())
    for compiled in (v.compiled_model, v.cold_model, v.autograd_model, v.unconnected_model):
        v.zero_grad()
        compiled(v.x).sum().backward()
        max_grad_err = max(max_grad_err, float((torch.stack([m.weight.grad for m in v.layers]) - g_seq).abs().max()))

    fwd = {k: [] for k in fns}
    bwd = {k: [] for k in fns}
    for _ in range(repeats + 1):  # the first round warms up and is dropped
        names = list(fns)
        random.shuffle(names)
        for name in names:
            v.next_step()  # untimed
            out = None
            gc.collect()
            gc.disable()
            try:
                t0 = time.perf_counter()
                out = fns[name]().sum()
                sync()
                t1 = time.perf_counter()
                out.backward()
                sync()
                t2 = time.perf_counter()
            finally:
                gc.enable()
            fwd[name].append(t1 - t0)
            bwd[name].append(t2 - t1)
    med = lambda xs: statistics.median(xs[1:])  # noqa: E731
    row = dict(L=L, w=w, B=B, device=device, iterations=v.stats.iterations, max_err=max_err,
               max_grad_err=max_grad_err)
    for name in fns:
        row[f"fwd_{name}_ms"] = 1e3 * med(fwd[name])
        row[f"bwd_{name}_ms"] = 1e3 * med(bwd[name])
    for name in VARIANTS[1:]:
        row[f"fwd_speedup_{name}"] = row["fwd_sequential_ms"] / row[f"fwd_{name}_ms"]
        row[f"bwd_speedup_{name}"] = row["bwd_sequential_ms"] / row[f"bwd_{name}_ms"]
    for name in ("compiled-autograd", "compiled-unconnected"):  # per-round ratios to compiled (same round)
        for kind, times in (("fwd", fwd), ("bwd", bwd)):
            row[f"ratio_{kind}_{name}"] = statistics.median(
                a / b for a, b in zip(times[name][1:], times["compiled"][1:]))
        row[f"ratio_step_{name}"] = statistics.median(
            (a + b) / (c + d) for a, b, c, d in zip(fwd[name][1:], bwd[name][1:], fwd["compiled"][1:],
                                                    bwd["compiled"][1:]))
    return row


VARIANTS = ("sequential", "solve", "solve+stack", "compiled", "compiled-cold", "compiled-autograd",
            "compiled-unconnected")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--L", type=int, nargs="+", default=[4096])
    ap.add_argument("--w", type=int, nargs="+", default=[4])
    ap.add_argument("--B", type=int, nargs="+", default=[1])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, as the suite)")
    ap.add_argument("--csv", default=None, help="default: benchmarks/results/backward_vs_autograd_<device>.csv")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [run(L, w, B, args.repeats, args.device) for L in args.L for w in args.w for B in args.B]
    for r in rows:
        print(f"L={r['L']} w={r['w']} B={r['B']} {r['device']}: {r['iterations']} Newton iterations, "
              f"max |y - y_seq| = {r['max_err']:.2e}, max |dW - dW_seq| = {r['max_grad_err']:.2e}")
        print(f"  {'variant':<20} {'forward ms':>11} {'backward ms':>12} {'fwd speedup':>12} {'bwd speedup':>12}")
        for name in VARIANTS:
            fs = 1.0 if name == "sequential" else r[f"fwd_speedup_{name}"]
            bs = 1.0 if name == "sequential" else r[f"bwd_speedup_{name}"]
            print(f"  {name:<20} {r[f'fwd_{name}_ms']:>11.2f} {r[f'bwd_{name}_ms']:>12.2f} {fs:>11.2f}x {bs:>11.2f}x")
        for name in ("compiled-autograd", "compiled-unconnected"):
            print(f"  {name} / compiled, per-round medians: forward {r[f'ratio_fwd_{name}']:.3f}, "
                  f"backward {r[f'ratio_bwd_{name}']:.3f}, step {r[f'ratio_step_{name}']:.3f}")
    path = Path(args.csv or Path(__file__).parent / "results" / f"backward_vs_autograd_{args.device}.csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
