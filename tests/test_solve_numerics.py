"""deeppcr.solve against the plain sequential loop: problems x Jacobian modes x lengths x dtypes."""
import pytest
import torch

import deeppcr_fx as deeppcr
from chains import PROBLEMS

MODES = ["full", "diag", "identity", "zero", "auto"]
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=1e-5),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _close(a, b, dtype):
    if isinstance(a, tuple):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, **TOL[dtype])
    else:
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("L", [1, 2, 3, 5, 40])
def test_matches_sequential_float64(problem, mode, L):
    chain = PROBLEMS[problem](L)
    res = deeppcr.solve(chain.step, chain.x0, per_step=chain.per_step, shared=chain.shared, jacobian=mode)
    _close(res.states, chain.sequential(), torch.float64)
    assert res.stats.length == L
    assert res.stats.iterations <= L


def _parts(x):
    return x if isinstance(x, tuple) else (x,)


def _max_err(a, truth):
    return max(float((x.double() - t).abs().max()) for x, t in zip(_parts(a), _parts(truth)))


def _assert_as_accurate_as_sequential(problem, L, dtype, mode, **options):
    """Low precision: compare with the float64 truth of the same (rounded) chain.

    Exact Newton ("full") ends with a correction that propagates every residual, so its
    round-off stays within 5x the plain loop's. The approximate modes freeze a row once its
    residual is below rtol (~8 ulp in float32) and do not propagate later corrections, so
    their error is the chain's amplification of residuals of that size: we hold them to the
    library's float32 contract, a normwise relative error of 1e-4.
    """
    exact = PROBLEMS[problem](L, dtype=torch.float64)
    chain = PROBLEMS[problem](L, dtype=dtype)
    truth = exact.sequential(x0=_to64(chain.x0), per_step=tuple(_to64(p) for p in chain.per_step),
                             shared=tuple(_to64(s) for s in chain.shared))
    res = deeppcr.solve(chain.step, chain.x0, per_step=chain.per_step, shared=chain.shared, jacobian=mode, **options)
    assert _parts(res.states)[0].dtype == dtype
    scale = max(1.0, max(float(t.abs().max()) for t in _parts(truth)))
    err_seq, err_par = _max_err(chain.sequential(), truth), _max_err(res.states, truth)
    if mode == "full":
        assert err_par <= 5 * err_seq + 1e-6 * scale, (err_par, err_seq, res.stats)
    else:
        assert err_par <= 1e-4 * scale, (err_par, err_seq, res.stats)
    return res


def _to64(x):
    return tuple(t.double() for t in x) if isinstance(x, tuple) else x.double()


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_as_accurate_as_sequential(problem, dtype):
    res = _assert_as_accurate_as_sequential(problem, 24, dtype, "full")
    assert res.stats.compute_dtype == "float32"


@pytest.mark.parametrize("mode", ["full", "diag", "identity"])
@pytest.mark.parametrize("problem", ["tanh", "residual", "ddim"])
def test_long_chain_L1000(problem, mode):
    _assert_as_accurate_as_sequential(problem, 1000, torch.float32, mode)


@pytest.mark.parametrize("problem,mode", [("tanh", "full"), ("residual", "diag")])
def test_long_chain_L1000_compiled_iteration(problem, mode):
    """The compiled backend (runtime/fused.py) on the same contract; a representative subset (each
    signature costs an inductor compile), the other modes in tests/test_fused.py."""
    res = _assert_as_accurate_as_sequential(problem, 1000, torch.float32, mode, backend="inductor")
    assert res.stats.backend == "inductor", res.stats.backend_error


def test_full_newton_converges_in_few_iterations():
    chain = PROBLEMS["tanh"](1000, dtype=torch.float32, B=1)
    res = deeppcr.solve(chain.step, chain.x0, per_step=chain.per_step, jacobian="full")
    assert res.stats.converged and res.stats.sequential_finish is None
    assert res.stats.iterations <= 12, res.stats
    # residuals are recorded per iteration and end below the tolerance
    assert len(res.stats.residuals) == res.stats.iterations and res.stats.residuals[-1] <= 1


def test_unbatched_state_and_scalar_state():
    chain = PROBLEMS["tanh"](7)
    x0 = chain.x0[0]  # a 1-D state: one sample
    res = deeppcr.solve(chain.step, x0, per_step=chain.per_step)
    torch.testing.assert_close(res.states, chain.sequential(x0=x0))
    assert res.stats.batch_size == 1
    c = torch.linspace(0.1, 0.5, 9, dtype=torch.float64)
    res = deeppcr.solve(lambda z, c: torch.cos(z) * c, torch.tensor(0.3, dtype=torch.float64), per_step=(c,))
    z, ref = torch.tensor(0.3, dtype=torch.float64), []
    for l in range(9):
        z = torch.cos(z) * c[l]
        ref.append(z)
    torch.testing.assert_close(res.states, torch.stack(ref))


def test_shared_weights_need_length():
    W = torch.eye(3, dtype=torch.float64) * 0.5
    res = deeppcr.solve(lambda z, W: torch.tanh(z @ W), torch.ones(2, 3, dtype=torch.float64), shared=(W,), length=6)
    z, ref = torch.ones(2, 3, dtype=torch.float64), []
    for _ in range(6):
        z = torch.tanh(z @ W)
        ref.append(z)
    torch.testing.assert_close(res.states, torch.stack(ref))


def test_non_tensor_shared_values_are_passed_through():
    c = torch.linspace(0.1, 0.5, 5, dtype=torch.float64)
    res = deeppcr.solve(lambda z, c, k: torch.sin(z) * c + k, torch.zeros(2, 2, dtype=torch.float64),
                        per_step=(c,), shared=(0.25,))
    z, ref = torch.zeros(2, 2, dtype=torch.float64), []
    for l in range(5):
        z = torch.sin(z) * c[l] + 0.25
        ref.append(z)
    torch.testing.assert_close(res.states, torch.stack(ref))


def test_vmap_fallback_to_loop_is_recorded():
    chain = PROBLEMS["tanh"](6)

    def step(z, W, b):
        if float(W.sum()) > 1e9:  # .item()-style data access: vmap cannot batch it
            return z
        return torch.tanh(torch.nn.functional.linear(z, W, b))

    res = deeppcr.solve(step, chain.x0, per_step=chain.per_step, jacobian="full")
    torch.testing.assert_close(res.states, chain.sequential())
    assert not res.stats.vectorized and res.stats.vmap_error
    with pytest.raises(RuntimeError, match="vectorize=True"):
        deeppcr.solve(step, chain.x0, per_step=chain.per_step, vectorize=True)


def test_forward_mode_jacobians_match_reverse_mode():
    from deeppcr_fx.runtime import jacobians

    chain = PROBLEMS["tuple"](6)
    from deeppcr_fx.runtime.state import StateSpec
    from deeppcr_fx.runtime.steps import Steps

    spec = StateSpec.of(chain.x0, None)
    g = Steps(chain.step, spec, chain.per_step, (), "auto").batched(0, 6)
    Z = torch.randn(6, 2, spec.width, dtype=torch.float64)
    for mode in ("full", "diag"):
        v_rev, jac_rev = jacobians.evaluate(g, Z, mode, "rev")
        v_fwd, jac_fwd = jacobians.evaluate(g, Z, mode, "fwd")
        A_rev, A_fwd = jac_rev(), jac_fwd()
        torch.testing.assert_close(v_rev, v_fwd)
        torch.testing.assert_close(A_rev, A_fwd)
    assert A_rev.shape == (6, 2, spec.width)
