"""The compiled iteration's linearise as one generated C++ loop over the rows (runtime/rowloop.py) against the
vmap'd pullback the one-graph iteration uses (``fused.NewtonIteration.linearise``), element by element; and
inside ``solve(..., backend="inductor")``: the stats say the row loop ran, the answer is the sequential loop's,
a step outside the generator's op set still solves through the one-graph iteration."""
import pytest
import torch
import torch.nn.functional as F

import deeppcr_fx as deeppcr
from chains import PROBLEMS, Chain
from deeppcr_fx.runtime import backend, fused, fused_solve, rowloop
from deeppcr_fx.runtime.modes import mode_of
from deeppcr_fx.runtime.state import StateSpec
from test_cloop import gru

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-13)}

CASES = {  # name: (chain factory, dtype, B, mode)
    "tanh-f64-B2-full": (lambda L, d, B: PROBLEMS["tanh"](L, dtype=d, B=B), torch.float64, 2, "full"),
    "tanh-f32-B1-diag": (lambda L, d, B: PROBLEMS["tanh"](L, dtype=d, B=B), torch.float32, 1, "diag"),
    "residual-f64-B1-full": (lambda L, d, B: PROBLEMS["residual"](L, dtype=d, B=B), torch.float64, 1, "full"),
    "residual-f32-B5-full": (lambda L, d, B: PROBLEMS["residual"](L, w=6, dtype=d, B=B), torch.float32, 5, "full"),
    "gru-f64-B1-full": (lambda L, d, B: gru(L, dtype=d, B=B), torch.float64, 1, "full"),
    "gru-f32-B3-full": (lambda L, d, B: gru(L, n=3, dtype=d, B=B), torch.float32, 3, "full"),
    "gru-f64-B2-diag": (lambda L, d, B: gru(L, n=3, dtype=d, B=B), torch.float64, 2, "diag"),
    "lstm-tuple-f64-B2-full": (lambda L, d, B: PROBLEMS["tuple"](L, dtype=d, B=B), torch.float64, 2, "full"),
    "lstm-tuple-f32-B1-full": (lambda L, d, B: PROBLEMS["tuple"](L, dtype=d, B=B), torch.float32, 1, "full"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_row_loop_matches_the_vmapped_pullback(name):
    make, dtype, B, mode = CASES[name]
    chain = make(33, dtype, B)
    spec = StateSpec.of(chain.x0, None)
    x0 = spec.flatten(chain.x0)
    rows = rowloop.compile_rows(chain.step, spec, mode_of(mode), chain.per_step, chain.shared, x0)
    g = torch.Generator().manual_seed(7)
    U = torch.randn(33, *x0.shape, generator=g, dtype=dtype)  # any iterate: rows read x0, then U[l - 1]
    vals, A = rows.empty(U)
    rows(U, x0, chain.per_step, chain.shared, vals, A)
    it = fused.NewtonIteration(chain.step, spec, len(chain.per_step), len(chain.shared), mode_of(mode), 1e-6, 1e-6, 0)
    with torch.no_grad():
        want_vals, want_A = it.linearise(torch.cat([x0.unsqueeze(0), U[:-1]]), (*chain.per_step, *chain.shared))
    assert A.shape == want_A.shape and vals.shape == want_vals.shape
    torch.testing.assert_close(vals, want_vals, **TOL[dtype])
    torch.testing.assert_close(A, want_A, **TOL[dtype])


def test_modes_without_matrices_and_ops_outside_the_set_are_refused():
    chain = PROBLEMS["tanh"](8)
    spec = StateSpec.of(chain.x0, None)
    x0 = spec.flatten(chain.x0)
    with pytest.raises(rowloop.Unsupported, match="mode identity"):
        rowloop.compile_rows(chain.step, spec, mode_of("identity"), chain.per_step, (), x0)
    step = lambda z, W, b: torch.cumsum(torch.tanh(F.linear(z, W, b)), -1)  # noqa: E731
    with pytest.raises(rowloop.Unsupported, match="cumsum"):
        rowloop.compile_rows(step, spec, mode_of("full"), chain.per_step, (), x0)


L = 40


def _solve(step, chain, mode="full"):
    return deeppcr.solve(step, chain.x0, per_step=chain.per_step, shared=chain.shared, jacobian=mode,
                         backend="inductor")


@pytest.mark.parametrize("problem,mode", [("tanh", "full"), ("gru", "full"), ("gru", "diag")])
def test_solve_runs_the_row_loop_and_matches_the_one_graph_iteration(problem, mode, monkeypatch):
    chain = PROBLEMS["tanh"](L) if problem == "tanh" else gru(L, n=3, B=2)
    step = lambda *a: chain.step(*a)  # noqa: E731 - its own cache entries
    res = _solve(step, chain, mode)
    f = res.stats.forward
    assert res.stats.backend == "inductor" and f.linearise_backend == "rows" and f.linearise_error is None
    assert f.iterations > 1  # the iterations ran, not only a sequential finish
    entries = [e for (_, key), e in backend._CACHE[step].items() if key[0] == "newton"]
    assert len(entries) == 1 and isinstance(entries[0].fn, rowloop.RowCall)
    torch.testing.assert_close(res.states, chain.sequential(), rtol=1e-9, atol=1e-9)
    monkeypatch.setattr(fused_solve, "ROW_LOOP", False)
    step2 = lambda *a: chain.step(*a)  # noqa: E731
    old = _solve(step2, chain, mode)
    assert old.stats.forward.linearise_backend == "inductor"
    assert (old.stats.forward.iterations, old.stats.forward.window_starts) == (f.iterations, f.window_starts)
    torch.testing.assert_close(res.states, old.states, rtol=1e-12, atol=1e-12)


def test_a_step_outside_the_op_set_solves_through_the_one_graph_iteration():
    chain = PROBLEMS["tanh"](L)
    step = lambda z, W, b: torch.tanh(torch.cumsum(F.linear(z, W, b), -1) * 0.5)  # noqa: E731
    res = _solve(step, chain)
    f = res.stats.forward
    assert res.stats.backend == "inductor" and f.linearise_backend == "inductor" and "cumsum" in f.linearise_error
    torch.testing.assert_close(res.states, Chain("c", step, chain.x0, chain.per_step).sequential(),
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("problem", ["tanh", "gru"])
def test_the_compiled_adjoint_takes_its_jacobians_from_the_row_loop(problem, monkeypatch):
    chain = PROBLEMS["tanh"](L) if problem == "tanh" else gru(L, n=3, B=2)

    def grads(step):
        x0 = chain.x0.clone().requires_grad_()
        ps = tuple(p.clone().requires_grad_() for p in chain.per_step)
        sh = tuple(s.clone().requires_grad_() for s in chain.shared)
        res = deeppcr.solve(step, x0, per_step=ps, shared=sh, jacobian="full", backend="inductor")
        return res, torch.autograd.grad(res.states.sin().sum(), (x0, *ps, *sh))

    res, got = grads(lambda *a: chain.step(*a))
    b = res.stats.backward
    assert b.backend == "inductor" and b.converged and b.linearise_backend == "rows"
    x0 = chain.x0.clone().requires_grad_()
    ps = tuple(p.clone().requires_grad_() for p in chain.per_step)
    sh = tuple(s.clone().requires_grad_() for s in chain.shared)
    z, states = x0, []
    for l in range(L):
        z = chain.step(z, *(p[l] for p in ps), *sh)
        states.append(z)
    want = torch.autograd.grad(torch.stack(states).sin().sum(), (x0, *ps, *sh))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-8)
    if problem != "gru":  # the one-graph adjoint's compile costs ~14 s on an empty cache: compared once
        return
    monkeypatch.setattr(fused_solve, "ROW_LOOP", False)
    old, old_got = grads(lambda *a: chain.step(*a))
    assert old.stats.backward.linearise_backend == "inductor"
    for g, w in zip(got, old_got):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
