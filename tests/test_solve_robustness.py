"""Never a wrong answer: chaotic steps, non-finite values, and clear errors for bad input."""
import math

import pytest
import torch

import deeppcr_fx as deeppcr
from chains import PROBLEMS


def _logistic(z, r):
    return r * z * (1 - z)


def _seq(step, x0, per_step):
    z, out = x0, []
    for l in range(per_step[0].shape[0]):
        z = step(z, *(p[l] for p in per_step))
        out.append(z)
    return torch.stack(out)


@pytest.mark.parametrize("mode", ["full", "identity"])
def test_chaotic_logistic_map_finishes_sequentially_and_exactly(mode):
    L = 200
    r = torch.full((L,), 3.9, dtype=torch.float64)
    x0 = torch.tensor([[0.2], [0.7]], dtype=torch.float64)
    res = deeppcr.solve(_logistic, x0, per_step=(r,), jacobian=mode, max_iter=10)
    stats = res.stats
    assert not stats.converged
    assert stats.sequential_finish in (deeppcr.FinishCause.MAX_ITER, deeppcr.FinishCause.NON_FINITE)
    assert stats.forward.sequential_from is not None and stats.forward.sequential_from < L
    # The Newton prefix is exact up to round-off, which chaos amplifies (Lyapunov exponent ~0.5):
    # compare the sequential finish against the plain loop started from the same prefix state.
    k = stats.forward.sequential_from
    assert k < 40
    prefix = _seq(_logistic, x0, (r[:k],)) if k else x0.unsqueeze(0)
    torch.testing.assert_close(res.states[:k], prefix[:k], rtol=1e-6, atol=1e-6)
    start = x0 if k == 0 else res.states[k - 1]
    torch.testing.assert_close(res.states[k:], _seq(_logistic, start, (r[k:],)), rtol=0, atol=0)
    assert math.isfinite(float(res.states.abs().max()))


def test_large_gain_tanh_stays_exact_under_max_iter():
    chain = PROBLEMS["tanh"](300, gain=6.0)
    res = deeppcr.solve(chain.step, chain.x0, per_step=chain.per_step, jacobian="full", max_iter=3)
    torch.testing.assert_close(res.states, chain.sequential(), rtol=1e-9, atol=1e-9)
    assert res.stats.sequential_finish == deeppcr.FinishCause.MAX_ITER


@pytest.mark.parametrize("mode", ["full", "diag", "identity", "zero"])
def test_nan_in_x0_behaves_like_the_sequential_loop(mode):
    chain = PROBLEMS["tanh"](12)
    x0 = chain.x0.clone()
    x0[0, 1] = float("nan")
    res = deeppcr.solve(chain.step, x0, per_step=chain.per_step, jacobian=mode)
    ref = chain.sequential(x0=x0)
    assert torch.equal(torch.isnan(res.states), torch.isnan(ref))
    torch.testing.assert_close(res.states, ref, equal_nan=True)
    assert res.stats.sequential_finish == deeppcr.FinishCause.NON_FINITE


def test_overflow_mid_chain_matches_sequential_inf():
    g = torch.linspace(1.0, 30.0, 40, dtype=torch.float32)
    step = lambda z, g: z * g  # noqa: E731  overflows to inf in float32 mid-chain
    x0 = torch.ones(1, 2)
    res = deeppcr.solve(step, x0, per_step=(g,))
    torch.testing.assert_close(res.states, _seq(step, x0, (g,)), equal_nan=True)


# ---------------------------------------------------------------- errors that name the problem
def test_per_step_lengths_must_agree():
    with pytest.raises(ValueError, match=r"must agree on the chain length L; got \[4, 5\]"):
        deeppcr.solve(lambda z, a, b: z, torch.zeros(2, 2), per_step=(torch.ones(4), torch.ones(5)))


def test_empty_chain():
    with pytest.raises(ValueError, match="L = 0"):
        deeppcr.solve(lambda z, a: z, torch.zeros(2, 2), per_step=(torch.ones(0),))
    with pytest.raises(ValueError, match="chain length"):
        deeppcr.solve(lambda z: z, torch.zeros(2, 2))


def test_step_changing_shape_or_dtype():
    with pytest.raises(ValueError, match=r"changed the state's shape from \(2, 3\) to \(2, 4\)"):
        deeppcr.solve(lambda z, a: torch.cat([z, z[:, :1]], 1), torch.zeros(2, 3), per_step=(torch.ones(3),))
    with pytest.raises(ValueError, match="changed the state's dtype from torch.float32 to torch.float64"):
        deeppcr.solve(lambda z, a: z.double(), torch.zeros(2, 3), per_step=(torch.ones(3),))
    with pytest.raises(ValueError, match="must return the state's structure"):
        deeppcr.solve(lambda hc, a: hc[0], (torch.zeros(2), torch.zeros(2)), per_step=(torch.ones(3),))


def test_x0_must_be_tensor_or_tuple_of_tensors():
    with pytest.raises(TypeError, match="x0 must be a tensor or a tuple of tensors, got a list"):
        deeppcr.solve(lambda z, a: z, [1.0, 2.0], per_step=(torch.ones(3),))
    with pytest.raises(TypeError, match="floating point"):
        deeppcr.solve(lambda z, a: z, torch.zeros(2, dtype=torch.long), per_step=(torch.ones(3),))


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="jacobian='dense'"):
        deeppcr.Config(jacobian="dense")
    with pytest.raises(TypeError, match="unknown deeppcr option"):
        deeppcr.solve(lambda z, a: z, torch.zeros(2), per_step=(torch.ones(3),), max_iters=3)
