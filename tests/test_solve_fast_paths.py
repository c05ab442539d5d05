"""The runtime's fast paths give the sequential answer: warm starts and replicated-batch Jacobians."""
import pytest
import torch
import torch.nn.functional as F

import deeppcr_fx as deeppcr
from chains import PROBLEMS
from deeppcr_fx.runtime import jacobians, modes
from torch.func import vjp, vmap


def _close(a, b):
    for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_warm_start_from_another_inputs_solution_is_exact(problem):
    chain = PROBLEMS[problem](40)
    kw = dict(per_step=chain.per_step, shared=chain.shared, jacobian="full")
    first = deeppcr.solve(chain.step, chain.x0, **kw)
    x1 = tuple(x + 0.3 for x in chain.x0) if isinstance(chain.x0, tuple) else chain.x0 + 0.3
    cold = deeppcr.solve(chain.step, x1, **kw)
    warm = deeppcr.solve(chain.step, x1, initial_guess=first.solution, **kw)
    _close(warm.states, chain.sequential(x0=x1))
    assert warm.stats.warm_start and not cold.stats.warm_start
    assert warm.solution.shape == first.solution.shape and not warm.solution.requires_grad
    # the exact answer as a guess: converged at the first residual check
    again = deeppcr.solve(chain.step, x1, initial_guess=warm.solution, **kw)
    assert again.stats.iterations == 1


def test_unusable_guesses_are_ignored():
    chain = PROBLEMS["tanh"](20)
    kw = dict(per_step=chain.per_step, jacobian="full")
    good = deeppcr.solve(chain.step, chain.x0, **kw).solution
    for guess in (good[:-1], good.float(), torch.full_like(good, float("nan"))):
        res = deeppcr.solve(chain.step, chain.x0, initial_guess=guess, **kw)
        assert not res.stats.warm_start
        _close(res.states, chain.sequential())


def test_compiled_chain_warm_starts_and_stays_exact():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[m for _ in range(16) for m in (torch.nn.Linear(4, 4), torch.nn.Tanh())]).double()
    compiled = deeppcr.compile(model, policy="always")
    cold = deeppcr.compile(model, policy="always", warm_start=False)
    for i in range(3):
        x = torch.randn(2, 4, dtype=torch.float64)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(cold(x), model(x), rtol=1e-9, atol=1e-9)
        stats = compiled.stats()[0].solves[-1]
        assert stats.warm_start == (i > 0)
        assert not cold.stats()[0].solves[-1].warm_start


def _jac_reference(g, Z):
    vals, pullback = vjp(g, Z)
    return jacobians.jacobian_from_pullback(lambda c: pullback(c)[0], vals, "full")


@pytest.mark.parametrize("B", [1, 3])
def test_replicated_jacobian_equals_vmapped_pullback(B):
    torch.manual_seed(0)
    L, n = 5, 4
    W, b = torch.randn(L, n, n, dtype=torch.float64), torch.randn(L, n, dtype=torch.float64)
    g = lambda Z: vmap(lambda z, W, b: torch.tanh(F.linear(z, W, b)))(Z, W, b)  # noqa: E731
    Z = torch.randn(L, B, n, dtype=torch.float64)
    J = jacobians.jacobian_replicated(g, Z, "full")
    torch.testing.assert_close(J, _jac_reference(g, Z))
    torch.testing.assert_close(jacobians.jacobian_replicated(g, Z, "diag"), torch.diagonal(J, dim1=-2, dim2=-1))


def test_solve_uses_replicated_jacobians_for_small_batched_states():
    chain = PROBLEMS["tanh"](30)
    res = deeppcr.solve(chain.step, chain.x0, per_step=chain.per_step, jacobian="full")
    assert res.stats.autodiff == "replicated" and res.stats.replicate_error is None
    _close(res.states, chain.sequential())
    unbatched = deeppcr.solve(chain.step, chain.x0, per_step=chain.per_step, jacobian="full", batch=False)
    assert unbatched.stats.autodiff == "rev"
    _close(unbatched.states, chain.sequential())


def test_step_with_a_fixed_batch_size_falls_back_and_stays_exact():
    chain = PROBLEMS["tanh"](30)
    B, w = chain.x0.shape

    def step(z, W, b):  # only works for the batch it was written for
        return torch.tanh(F.linear(z.reshape(B, w), W, b))

    W, b = (p.detach().requires_grad_() for p in chain.per_step)
    memo = jacobians.ReplicationMemo()  # what PCRSolve holds for its chain
    res = deeppcr.solve(step, chain.x0, per_step=(W, b), jacobian="full", replication=memo)
    assert res.stats.autodiff == "rev" and "RuntimeError" in res.stats.replicate_error
    assert memo.accepts is False
    _close(res.states, chain.sequential())
    again = deeppcr.solve(step, chain.x0, per_step=(W, b), jacobian="full", replication=memo)
    assert again.stats.autodiff == "rev" and again.stats.replicate_error is None  # remembered, not retried
    alone = deeppcr.solve(step, chain.x0, per_step=chain.per_step, jacobian="full")  # no memo: tried again
    assert alone.stats.autodiff == "rev" and "RuntimeError" in alone.stats.replicate_error
    res.states[-1].sum().backward()  # the backward pass falls back too
    W2, b2 = (p.detach().requires_grad_() for p in chain.per_step)
    chain.sequential(per_step=(W2, b2))[-1].sum().backward()
    torch.testing.assert_close(W.grad, W2.grad)
    torch.testing.assert_close(b.grad, b2.grad)


def _coupled_step(z, W):  # every sample sees the batch mean: per-sample Jacobians are approximate
    return torch.tanh(z @ W + z.mean(0, keepdim=True) @ W)


@pytest.mark.parametrize("mode", ["full", "diag", "identity"])
def test_samples_coupled_within_a_step_still_get_exact_answers_and_gradients(mode):
    torch.manual_seed(0)
    L, B, n = 10, 3, 4
    W = (torch.randn(L, n, n, dtype=torch.float64) * 0.5).requires_grad_()
    x0 = torch.randn(B, n, dtype=torch.float64, requires_grad=True)
    res = deeppcr.solve(_coupled_step, x0, per_step=(W,), jacobian=mode)
    z = x0
    for l in range(L):
        z = _coupled_step(z, W[l])
    torch.testing.assert_close(res.states[-1], z)
    got = torch.autograd.grad(res.states[-1].pow(2).sum(), (W, x0))
    expected = torch.autograd.grad(z.pow(2).sum(), (W, x0))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    if mode == "full":
        assert res.stats.backward.iterations > 1  # the free check caught the approximate Jacobians


def test_independent_samples_pass_the_adjoint_check_in_float32():
    chain = PROBLEMS["tanh"](300, dtype=torch.float32, B=4)
    W, b = (p.detach().requires_grad_() for p in chain.per_step)
    res = deeppcr.solve(chain.step, chain.x0, per_step=(W, b), jacobian="full")
    (res.states * torch.linspace(-3, 3, 4).view(1, 4, 1)).sum().backward()
    assert res.stats.backward.iterations == 1 and res.stats.backward.converged


def test_inputs_with_the_batch_dimension_skip_replication(capsys):
    chain = PROBLEMS["ddim"](12)  # B = 3
    noise = torch.randn(12, *chain.x0.shape, dtype=chain.x0.dtype)  # per step and per sample

    def step(z, a, s, e, n, Wd):
        return chain.step(z, a, s, e, Wd) + 0.01 * n

    res = deeppcr.solve(step, chain.x0, per_step=(*chain.per_step, noise), shared=chain.shared, jacobian="full")
    assert res.stats.autodiff == "rev" and res.stats.replicate_error is None
    z = chain.x0
    for l in range(12):
        z = step(z, *(p[l] for p in (*chain.per_step, noise)), *chain.shared)
    torch.testing.assert_close(res.states[-1], z)
    assert capsys.readouterr().err == ""


def test_auto_mode_keeps_full_jacobians_within_a_memory_bound():
    assert modes.choose_mode("auto", 4, 64, rows=4096) == "full"
    assert modes.choose_mode("auto", 64, 64, rows=1000 * 64) == "identity"  # 262M Jacobian elements
    assert modes.choose_mode("auto", 64, 64) == "full"  # no row count: the width alone decides
    assert modes.choose_mode("full", 64, 64, rows=1000 * 64) == "full"  # an explicit mode is kept
