"""Graph breaks: a model with data-dependent Python outside its chain still compiles.

Symbolic tracing and recording cannot follow ``if x.sum() > 0``; the default front end then hands
the model to TorchDynamo, which captures the regions between graph breaks and guards the Python
between them. The chain after the branch is rewritten; both branches give eager's values and
gradients, and the report says what happened.
"""
import torch
import torch.nn as nn

import deeppcr_fx as deeppcr


class Branchy(nn.Module):
    def __init__(self, depth: int = 16, width: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(width, width) for _ in range(depth)])

    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python: a graph break
            x = x * 2
        else:
            x = x - 1
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def test_both_branches_match_eager_values_and_gradients():
    model = Branchy().double()
    compiled = deeppcr.compile(model, policy="always")
    for sign in (1.0, -1.0, 1.0, -1.0):
        x = sign * (torch.rand(3, 4, dtype=torch.float64) + 0.1)
        out = compiled(x)
        grads = torch.autograd.grad(out.square().sum(), [model.layers[0].weight, model.layers[-1].bias])
        ref = model(x)
        ref_grads = torch.autograd.grad(ref.square().sum(), [model.layers[0].weight, model.layers[-1].bias])
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10)
    report = compiled.report
    assert report.front_end == "dynamo"
    assert report.rewritten and all(c.length == 16 for c in report.rewritten)
    assert any("graph breaks" in n for n in report.notes)


def test_symbolic_only_still_fails_clearly():
    """``front_end="symbolic"`` asks for one graph: the branch is an error that names the front ends."""
    compiled = deeppcr.compile(Branchy().double(), policy="always", front_end="symbolic")
    try:
        compiled(torch.rand(3, 4, dtype=torch.float64))
    except deeppcr.CompileError as exc:
        assert "control flow" in str(exc)
    else:
        raise AssertionError("a data-dependent branch under front_end='symbolic' must raise")
