"""What the runtime remembers, who owns it, and the torch behaviour it relies on.

- ``stacked.FlatGroups``: the flat buffers of Parameter runs; entries die with their tensors; ``clear()``.
- ``jacobians.ReplicationMemo``: a chain's memory of a refused replicated batch, held by ``PCRSolve``.
- no stderr output when a GraphModule step refuses (torch.fx's print avoided, no redirection of
  the process's stderr, so another thread's output is untouched).
- ``SolveStats.vmap_error`` is recorded when vmap fails in the backward pass alone.
- ``direct_grads.GradBuffer``: the reference counts it reads, pinned.
"""
import gc
import sys
import threading

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import deeppcr_fx as deeppcr
from chains import PROBLEMS
from deeppcr_fx.runtime import jacobians, stacked
from deeppcr_fx.runtime.direct_grads import GradBuffer
from deeppcr_fx.runtime.pcr_solve import PCRSolve
from deeppcr_fx.runtime.stacked import FlatGroups, StackedAttributes


class MLP(nn.Module):
    def __init__(self, L=10, w=3):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(w, w) for _ in range(L))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def _grads(model, fn, x):
    model.zero_grad(set_to_none=True)
    fn(x).sum().backward()
    return [p.grad.clone() for p in model.parameters()]


# --- flat groups --------------------------------------------------------------------------
def test_flat_groups_live_as_long_as_their_parameters():
    torch.manual_seed(0)
    model = MLP().double()
    gc.collect()  # earlier tests' models go first
    before = len(stacked.FLAT_GROUPS)
    compiled = deeppcr.compile(model, policy="always")
    compiled(torch.randn(2, 3, dtype=torch.float64))
    assert len(stacked.FLAT_GROUPS) == before + 2  # the weights' run and the biases' run
    del model, compiled
    gc.collect()
    assert len(stacked.FLAT_GROUPS) == before


def test_clearing_the_flat_groups_keeps_values_and_gradients():
    torch.manual_seed(0)
    model = MLP().double()
    compiled = deeppcr.compile(model, policy="always")
    x = torch.randn(2, 3, dtype=torch.float64)
    compiled(x)
    weights = [layer.weight for layer in model.layers]
    ptr = weights[0].data_ptr()
    stacked.FLAT_GROUPS.clear()
    assert len(stacked.FLAT_GROUPS) == 0
    torch.testing.assert_close(weights[0].detach(), model.layers[0].weight.detach())  # values unchanged
    torch.testing.assert_close(compiled(x), model(x))  # flattened again, into a new buffer
    assert weights[0].data_ptr() != ptr and len(stacked.FLAT_GROUPS) == 2
    for a, b in zip(_grads(model, compiled, x), _grads(model, model, x)):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        compiled(x)  # a second specialisation finds the new group: no re-flattening
    assert weights[0].data_ptr() == model.layers[0].weight.data_ptr()
    assert all(m.mode == "flat" for m in compiled.graph_module.modules() if isinstance(m, StackedAttributes))


def test_a_registry_of_its_own():
    torch.manual_seed(0)
    model = MLP(L=4).double()
    root = fx.symbolic_trace(model)
    groups = FlatGroups()
    module = StackedAttributes(root, [f"layers.{i}.weight" for i in range(4)], groups=groups)
    before = len(stacked.FLAT_GROUPS)
    with torch.no_grad():
        out = module()
    torch.testing.assert_close(out, torch.stack([layer.weight for layer in model.layers]))
    assert module.mode == "flat" and len(groups) == 1 and len(stacked.FLAT_GROUPS) == before


# --- replication memo and stderr ----------------------------------------------------------
class FixedBatch(nn.Module):
    """Steps written for a batch of exactly 3: a replicated batch fails inside the generated code."""

    def __init__(self, L=10, w=4):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(w, w) for _ in range(L))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x)).reshape(3, 4)
        return x


def test_pcr_solve_remembers_a_refused_replication_quietly(capsys):
    torch.manual_seed(0)
    model = FixedBatch().double()
    compiled = deeppcr.compile(model, policy="always", jacobian="full", warm_start=False)
    x = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(compiled(x), model(x))
    (solver,) = [m for m in compiled.graph_module.modules() if isinstance(m, PCRSolve)]
    assert "RuntimeError" in solver.last_stats.replicate_error and solver.replication.accepts is False
    torch.testing.assert_close(compiled(x), model(x))
    assert solver.last_stats.replicate_error is None and solver.last_stats.autodiff == "rev"  # not tried again
    solver.replication.reset()
    compiled(x)
    assert "RuntimeError" in solver.last_stats.replicate_error  # tried again after the reset
    assert capsys.readouterr().err == ""  # torch.fx printed nothing


_meeting = {"entered": threading.Event(), "written": threading.Event()}


def _rendezvous(z):
    if z.shape[0] != 3:  # the replicated batch: let the other thread write while the attempt runs
        _meeting["entered"].set()
        _meeting["written"].wait(10)
    return z


fx.wrap("_rendezvous")


class _Step(nn.Module):
    def forward(self, z, W, b):
        return torch.tanh(F.linear(_rendezvous(z), W, b)).reshape(3, 4)


def test_a_refused_replication_leaves_other_threads_stderr_alone(capsys):
    step = fx.symbolic_trace(_Step())
    torch.manual_seed(0)
    W, b = torch.randn(8, 4, 4, dtype=torch.float64) / 2, torch.randn(8, 4, dtype=torch.float64)
    x0 = torch.randn(3, 4, dtype=torch.float64)

    def other():
        if _meeting["entered"].wait(10):
            print("written by another thread", file=sys.stderr)
        _meeting["written"].set()

    thread = threading.Thread(target=other)
    thread.start()
    try:
        res = deeppcr.solve(step, x0, per_step=(W, b), jacobian="full")
    finally:
        _meeting["written"].set()
        thread.join()
    assert _meeting["entered"].is_set() and "RuntimeError" in res.stats.replicate_error
    z = x0
    for l in range(8):
        z = step(z, W[l], b[l])
    torch.testing.assert_close(res.states[-1], z)
    assert capsys.readouterr().err == "written by another thread\n"


def test_a_graph_module_with_hooks_is_called_with_its_hooks():
    step = fx.symbolic_trace(_Step())
    calls = []
    step.register_forward_hook(lambda *_: calls.append(1))
    W, b = torch.randn(8, 4, 4, dtype=torch.float64) / 2, torch.randn(8, 4, dtype=torch.float64)
    deeppcr.solve(step, torch.randn(3, 4, dtype=torch.float64), per_step=(W, b), jacobian="identity")
    assert calls
    calls.clear()
    plain = fx.symbolic_trace(_Step())
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *_: calls.append(1))
    try:
        deeppcr.solve(plain, torch.randn(3, 4, dtype=torch.float64), per_step=(W, b), jacobian="identity")
    finally:
        handle.remove()
    assert calls  # a global hook too


# --- vmap fallback recorded on every path -------------------------------------------------
def test_vmap_failing_in_the_backward_alone_is_recorded():
    chain = PROBLEMS["tanh"](6)
    state = {"backward": False}

    def step(z, W, b):
        if state["backward"]:
            float(W.detach().sum())  # data access: vmap cannot batch it; the per-step loop can
        return torch.tanh(F.linear(z, W, b))

    W, b = (p.detach().requires_grad_() for p in chain.per_step)
    res = deeppcr.solve(step, chain.x0, per_step=(W, b), jacobian="identity")
    assert res.stats.vectorized and res.stats.vmap_error is None
    state["backward"] = True
    res.states[-1].sum().backward()
    assert not res.stats.vectorized and "RuntimeError" in res.stats.vmap_error
    W2, b2 = (p.detach().requires_grad_() for p in chain.per_step)
    chain.sequential(per_step=(W2, b2))[-1].sum().backward()
    torch.testing.assert_close(W.grad, W2.grad)


# --- direct gradients: the counts GradBuffer reads ------------------------------------------
def _use_count(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def test_the_reference_counts_direct_grads_relies_on():
    """GradBuffer._unreferenced reads these exact counts: if a torch release changes one, this fails
    (rather than a kept gradient silently changing, or the views never being reused)."""
    buf = torch.randn(4, 3)
    views = buf.unbind(0)
    assert _use_count(buf) == 2 + len(views)  # the buffer, the temporary storage object, one per view
    free = next(map(sys.getrefcount, views))
    assert all(c == free for c in map(sys.getrefcount, views))
    p = nn.Parameter(torch.zeros(3))
    p.grad = views[0]
    assert p.grad is views[0]  # .grad hands back the same Python object...
    assert next(map(sys.getrefcount, views)) == free + 1  # ...and holds a reference to it
    kept = p.grad
    assert next(map(sys.getrefcount, views)) == free + 2
    p.grad = None
    del kept
    assert next(map(sys.getrefcount, views)) == free and _use_count(buf) == 2 + len(views)
    part = views[1][:2]  # a slice or a detached alias shares the storage: counted there
    alias = views[2].detach()
    assert _use_count(buf) == 4 + len(views)
    del part, alias
    assert _use_count(buf) == 2 + len(views)


def test_grad_buffer_reuses_its_views_only_when_nothing_holds_them():
    grads = GradBuffer()
    G = torch.randn(4, 3)
    views = grads.rows(G)
    assert grads.rows(2 * G) is views  # unreferenced: reused, the new values copied in
    torch.testing.assert_close(views[0], 2 * G[0])
    p = nn.Parameter(torch.zeros(3))
    for hold in ("grad", "name", "slice", "alias"):
        views = grads.rows(G)
        kept = None
        if hold == "grad":
            p.grad = views[1]
        elif hold == "name":
            kept = views[1]
        elif hold == "slice":
            kept = views[1][1:]
        else:
            kept = views[1].detach()
        values = views[1].clone()
        assert grads.rows(3 * G) is not views, hold  # held: a new buffer, the old values untouched
        torch.testing.assert_close(views[1], values, rtol=0, atol=0)
        p.grad, kept = None, None
