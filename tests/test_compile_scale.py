"""Compiling deep models: the shortcuts that keep tracing and finding linear give the same results.

- ``passes/trace_memo.py`` replays the nodes of an identical earlier module call: the graph (code and
  ``nn_module_stack``) equals the one traced call by call, and modules that differ in anything their
  trace reads (attributes, shapes, dtypes, training flag, argument shapes a forward asks for) are not
  conflated; the attribute guard still records every replayed module's reads.
- ``passes/shape_prop.py`` shares Parameter metas by shape: different shapes stay different.
- The build pauses Python's garbage collector and turns it back on (only if it was on).
No timing assertions (``benchmarks/compile_scale.py`` measures).
"""
import gc

import pytest
import torch
import torch.nn as nn

import deeppcr_fx as deeppcr
from deeppcr_fx.passes import trace as trace_module
from deeppcr_fx.passes.shape_prop import info_of, propagate
from deeppcr_fx.passes.trace import InliningTracer, trace


class Block(nn.Module):
    def __init__(self, width=4, scale=0.5):
        super().__init__()
        self.a, self.norm, self.scale = nn.Linear(width, width), nn.LayerNorm(width), scale

    def forward(self, x):
        return x + self.scale * self.norm(torch.relu(self.a(x))).reshape(x.shape[0], -1)


class Cell(nn.Module):  # one module called at every step, with h0 made inside forward
    def __init__(self):
        super().__init__()
        self.cell, self.inp = nn.GRUCell(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        h = torch.zeros(x.shape[0], 4)
        for t in range(x.shape[1]):
            h = self.cell(self.inp(x[:, t]), h)
        return h


class Flatten(nn.Module):  # its graph depends on the argument's shape
    def forward(self, x):
        return x.reshape(x.shape[0], -1) if x.dim() > 2 else x * 2


class Shapes(nn.Module):
    def __init__(self):
        super().__init__()
        self.f1, self.f2, self.f3 = Flatten(), Flatten(), Flatten()

    def forward(self, x):
        return self.f3(self.f2(self.f1(x).unsqueeze(-1)).unsqueeze(-1))


def _traced(model, *inputs, memoize=True):
    InliningTracer.memoize = memoize
    try:
        gm = trace(model, inputs).graph_module
    finally:
        InliningTracer.memoize = True
    return gm.code, [(n.name, dict(n.meta.get("nn_module_stack") or {})) for n in gm.graph.nodes]


def _mixed():
    torch.manual_seed(0)
    blocks = [Block() for _ in range(6)]
    blocks[2].scale = 0.7  # a plain attribute that differs
    blocks[3].train(False)  # the training flag differs
    blocks[4] = Block(scale=0.5).double().float()
    blocks[4].a.weight.requires_grad_(False)  # requires_grad differs
    return nn.Sequential(*blocks, nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))


@pytest.mark.parametrize("case", ["chain", "mixed", "cell", "shapes"])
def test_replayed_graph_equals_the_traced_one(case):
    model, x = {
        "chain": (nn.Sequential(*[m for _ in range(12) for m in (nn.Linear(4, 4), nn.Tanh())]), torch.randn(2, 4)),
        "mixed": (_mixed(), torch.randn(3, 4)),
        "cell": (Cell(), torch.randn(2, 6, 4)),
        "shapes": (Shapes(), torch.randn(2, 3)),
    }[case]
    assert _traced(model, x) == _traced(model, x, memoize=False)


def test_identical_calls_are_replayed_and_different_ones_are_not(monkeypatch):
    recorded, replayed = [], []
    original_record, original_replay = trace_module.ModuleMemo.record, trace_module.ModuleMemo.replay

    def record(self, key, m, *rest):
        recorded.append(type(m).__name__)
        return original_record(self, key, m, *rest)

    def replay(self, key, m, *rest):
        out = original_replay(self, key, m, *rest)
        if out is not trace_module.MISS:
            replayed.append(type(m).__name__)
        return out

    monkeypatch.setattr(trace_module.ModuleMemo, "record", record)
    monkeypatch.setattr(trace_module.ModuleMemo, "replay", replay)
    trace(_mixed(), (torch.randn(3, 4),))
    # Blocks 0, 1, 5 are identical (block 5's Linear/LayerNorm replay inside it as well); block 2's scale,
    # block 3's training flag and block 4's requires_grad differ; the 4->8, 8->8 and 8->4 Linears differ.
    assert replayed.count("Block") == 2 and recorded.count("Block") == 4
    assert recorded.count("Linear") == 1 + 2 + 3  # the blocks' first (4->4), block 3's and 4's, 3 other widths
    assert recorded.count("LayerNorm") == 2  # block 0's, block 3's (eval)
    assert replayed.count("Tanh") == 1


def test_a_forward_that_asks_shapes_is_keyed_on_them():
    x = torch.randn(2, 3)
    code, _ = _traced(Shapes(), x)
    assert "reshape" in code and "mul" in code  # f1 multiplies (2-D), f2 and f3 reshape (3-D)
    assert code == _traced(Shapes(), x, memoize=False)[0]


def test_guard_sees_the_attributes_of_replayed_modules():
    torch.manual_seed(0)
    model = nn.Sequential(*[Block() for _ in range(8)])
    compiled = deeppcr.compile(model, policy="always", backend="eager")
    x = torch.randn(2, 4)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
        assert compiled.specialisations == 1
        model[5].scale = 0.9  # a replayed block's attribute: the guard must notice
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
    assert compiled.specialisations == 1 and compiled.report.rewritten  # re-specialised, not stale


def test_deep_chain_is_one_chain_and_matches_eager():
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(2000) for m in (nn.Linear(4, 4), nn.Tanh())])
    compiled = deeppcr.compile(model, policy="always", backend="eager")
    x = torch.randn(1, 4)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
    assert [c.length for c in compiled.report.rewritten] == [2000]


def test_parameter_metas_shared_by_shape_keep_shapes_apart():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3), nn.Linear(3, 8).double())
    gm = trace(model, (torch.randn(2, 4),)).graph_module
    propagate(gm, (torch.randn(2, 4),))
    shapes = {n.target: (info_of(n).shape, info_of(n).dtype) for n in gm.graph.nodes if n.op == "get_attr"}
    for name, p in model.named_parameters():
        assert shapes[name] == (tuple(p.shape), p.dtype)


@pytest.mark.parametrize("was_enabled", [True, False])
def test_build_pauses_the_garbage_collector_and_restores_it(was_enabled, monkeypatch):
    seen = []
    original = trace_module.trace if hasattr(trace_module, "trace") else None
    import deeppcr_fx.specialise as specialise

    def spying(*a, **k):
        seen.append(gc.isenabled())
        return original(*a, **k)

    monkeypatch.setattr(specialise, "trace", spying)
    (gc.enable if was_enabled else gc.disable)()
    try:
        compiled = deeppcr.compile(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh()))
        compiled(torch.randn(2, 4))
        assert seen == [False] and gc.isenabled() == was_enabled
    finally:
        gc.enable()
