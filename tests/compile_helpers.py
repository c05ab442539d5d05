"""Shared checks for the compiler tests: structure, numerics and gradients vs the original model."""
from __future__ import annotations

import torch

import deeppcr_fx as deeppcr

TOL = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=1e-5)}


def check_structure(compiled, expected):
    """Chains (L, period) as expected, one PCRSolve per chain, replaced nodes gone, graph lints."""
    report, gm = compiled.report, compiled.graph_module
    assert [(c.length, c.period) for c in report.rewritten] == expected, str(report)
    gm.graph.lint()
    solves = [n for n in gm.graph.nodes if n.op == "call_module"
              and isinstance(gm.get_submodule(n.target), deeppcr.PCRSolve)]
    assert len(solves) == len(expected)
    names = {n.name for n in gm.graph.nodes}
    for rec in report.rewritten:
        assert rec.replaced and names.isdisjoint(rec.replaced)
        mod = gm.get_submodule(rec.submodule)
        assert (mod.length, mod.period) == (rec.length, rec.period)


def grads(model, inputs, out):
    """d<weight, out>/d(params, input leaves) by ``loss.backward()`` (as a training loop gets them: a
    compiled chain writes its Parameters' ``.grad`` directly); None where unused. ``.grad`` is restored."""
    tensors = [p for p in model.parameters() if p.requires_grad]
    tensors += [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    torch.manual_seed(1)
    weight = torch.randn_like(out)
    saved = [t.grad for t in tensors]
    for t in tensors:
        t.grad = None
    (out * weight).sum().backward()
    result = [t.grad for t in tensors]
    for t, g in zip(tensors, saved):
        t.grad = g
    return result


def check_numerics(model, compiled, inputs, dtype, gradients=True):
    """Outputs and all parameter (and input) gradients match the original model; returns the max error."""
    inputs = tuple(x.detach().clone().requires_grad_(x.is_floating_point()) if isinstance(x, torch.Tensor) else x
                   for x in inputs)
    compiled(*inputs)  # specialise first: a recording front end returns the original run's output once
    ref = model(*inputs)
    out = compiled(*inputs)
    tol = TOL[dtype]
    torch.testing.assert_close(out, ref, **tol)
    err = (out - ref).abs().max().item()
    if gradients:
        g_ref = grads(model, inputs, ref)
        g_out = grads(model, inputs, out)
        for a, b in zip(g_out, g_ref):
            if b is None:
                assert a is None or a.abs().max() == 0
                continue
            torch.testing.assert_close(a, b, **tol)
            err = max(err, (a - b).abs().max().item())
    return err
