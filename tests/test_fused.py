"""The compiled iteration (``Config(backend="inductor")``, runtime/fused.py) against the eager runtime and
the plain sequential loop. Inductor compiles cost seconds, so the problems are few and built once per
module: every test that solves one reuses its compiled kernels (``runtime/backend.py``'s cache)."""
import math

import pytest
import torch

import deeppcr_fx as deeppcr
from chains import PROBLEMS
from deeppcr_fx.results import FinishCause, InvalidInput
from deeppcr_fx.runtime import backend, fused_scan, fused_solve, scan
from deeppcr_fx.runtime.modes import mode_of

L = 24
# one chain object per problem for the whole module (same step objects: compiled once)
CHAINS = {name: PROBLEMS[name](L) for name in ("tanh", "residual", "ddim", "tuple")}
CASES = [("tanh", "full"), ("residual", "diag"), ("ddim", "identity"), ("tuple", "full"), ("tanh", "zero")]


def _solve(chain, mode, backend_name, **kw):
    return deeppcr.solve(chain.step, chain.x0, per_step=chain.per_step, shared=chain.shared, jacobian=mode,
                         backend=backend_name, **kw)


def _close(a, b, **tol):
    for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        torch.testing.assert_close(x, y, **tol)


@pytest.mark.parametrize("problem,mode", CASES)
def test_compiled_iteration_matches_eager_and_sequential(problem, mode):
    chain = CHAINS[problem]
    eager = _solve(chain, mode, "eager")
    compiled = _solve(chain, mode, "inductor")
    assert compiled.stats.backend == "inductor", compiled.stats.backend_error
    _close(compiled.states, chain.sequential(), rtol=1e-9, atol=1e-9)
    _close(compiled.states, eager.states, rtol=1e-9, atol=1e-9)
    f, e = compiled.stats.forward, eager.stats.forward
    # the same algorithm: the same iterations, windows and outcome (residuals to round-off)
    assert (f.iterations, f.window_starts, f.converged, f.sequential_finish) == \
        (e.iterations, e.window_starts, e.converged, e.sequential_finish)
    big = [i for i, r in enumerate(e.residuals) if r > 1]  # below 1 they are round-off of different kernels
    assert [f.residuals[i] for i in big] == pytest.approx([e.residuals[i] for i in big], rel=1e-6)


def test_compiled_forward_and_adjoint_gradients_match_autograd():
    chain = CHAINS["tanh"]
    W, b = (p.clone().requires_grad_() for p in chain.per_step)
    x0 = chain.x0.clone().requires_grad_()
    res = deeppcr.solve(chain.step, x0, per_step=(W, b), jacobian="full", backend="inductor")
    assert res.stats.backend == "inductor"
    got = torch.autograd.grad(res.states.sin().sum(), (x0, W, b))
    assert res.stats.backward.backend == "inductor" and res.stats.backward.converged  # the compiled adjoint
    z, states = x0, []
    for l in range(L):
        z = chain.step(z, W[l], b[l])
        states.append(z)
    want = torch.autograd.grad(torch.stack(states).sin().sum(), (x0, W, b))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


def test_gradcheck_through_the_compiled_forward_and_adjoint():
    chain = CHAINS["tanh"]  # the signature of the test above: its compiled functions are reused
    inputs = (chain.x0.clone().requires_grad_(), *(p.clone().requires_grad_() for p in chain.per_step))

    def f(x0, W, b):
        res = deeppcr.solve(chain.step, x0, per_step=(W, b), jacobian="full", backend="inductor")
        assert res.stats.backend == "inductor"
        return res.states

    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)


def test_chunked_scan_in_the_compiled_forward_and_adjoint(monkeypatch):
    monkeypatch.setattr(fused_solve.CompiledForward, "chunk", 3)  # layer-parallel slices' scan, in one process
    chain = CHAINS["residual"]
    W, b = (p.clone().requires_grad_() for p in chain.per_step)
    res = deeppcr.solve(chain.step, chain.x0, per_step=(W, b), jacobian="full", backend="inductor")
    assert res.stats.backend == "inductor" and res.stats.converged
    _close(res.states, chain.sequential(), rtol=1e-9, atol=1e-9)
    got = torch.autograd.grad(res.states.sum(), (W, b))
    assert res.stats.backward.backend == "inductor"
    want = torch.autograd.grad(chain.sequential(per_step=(W, b)).sum(), (W, b))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


def test_compiled_kernels_are_reused_across_solves():
    chain = CHAINS["tanh"]
    _solve(chain, "full", "inductor")
    x0 = torch.randn_like(chain.x0)  # a fresh input of the same signature
    again = deeppcr.solve(chain.step, x0, per_step=chain.per_step, jacobian="full", backend="inductor")
    assert again.stats.backend == "inductor" and again.stats.compile_s is None
    _close(again.states, chain.sequential(x0=x0), rtol=1e-9, atol=1e-9)


def test_non_finite_and_max_iter_finish_sequentially():
    chain = CHAINS["tanh"]
    capped = _solve(chain, "full", "inductor", max_iter=2)
    assert capped.stats.sequential_finish is FinishCause.MAX_ITER and capped.stats.iterations == 2
    eager = _solve(chain, "full", "eager", max_iter=2)
    assert capped.stats.forward.sequential_from == eager.stats.forward.sequential_from
    _close(capped.states, chain.sequential(), rtol=1e-9, atol=1e-9)
    # the full mode's finish entry (other tests' modes on this chain may hold one never compiled: a short tail)
    finishes = [e for (_, key), e in backend._CACHE[chain.step].items() if key[:3] == ("cloop", "newton", "full")]
    assert finishes and all(e.fn is not None for e in finishes)  # the finish ran as the generated C++ loop
    assert capped.stats.forward.finish_backend == "cloop"
    x0 = chain.x0.clone()
    x0[0, 0] = math.inf  # the sequential answer holds inf/nan too: equal where finite, same pattern
    res = deeppcr.solve(chain.step, x0, per_step=chain.per_step, jacobian="full", backend="inductor")
    assert res.stats.backend == "inductor" and res.stats.sequential_finish is FinishCause.NON_FINITE
    torch.testing.assert_close(res.states, chain.sequential(x0=x0), equal_nan=True)


def test_a_step_that_closes_over_tensors_runs_eagerly_and_says_why():
    W = torch.randn(3, 3, dtype=torch.float64) / 3
    x0 = torch.randn(2, 3, dtype=torch.float64)
    res = deeppcr.solve(lambda z, c: torch.tanh(z @ W) + c, x0, per_step=(torch.zeros(6, 1, dtype=torch.float64),),
                        backend="inductor")
    assert res.stats.backend == "eager" and "closes over" in res.stats.backend_error
    z, want = x0, []
    for _ in range(6):
        z = torch.tanh(z @ W)
        want.append(z)
    torch.testing.assert_close(res.states, torch.stack(want))


def test_auto_compiles_only_once_eager_time_would_have_paid_for_it(monkeypatch):
    chain = CHAINS["residual"]
    assert _solve(chain, "diag", "auto").stats.backend in ("eager", "inductor")  # inductor if compiled above
    fresh = PROBLEMS["residual"](L)  # a new step object: nothing compiled for it yet
    first = _solve(fresh, "diag", "auto")
    assert first.stats.backend == "eager" and first.stats.compile_s is None
    monkeypatch.setitem(backend.COMPILE_PRIOR_S, "cpu", 0.0)  # eager time already exceeds the prior
    second = _solve(fresh, "diag", "auto")
    assert second.stats.backend == "inductor"
    _close(second.states, fresh.sequential(), rtol=1e-9, atol=1e-9)


def test_backend_options_are_checked_and_cuda_graphs_is_a_no_op_on_cpu():
    with pytest.raises(InvalidInput, match="backend"):
        deeppcr.Config(backend="jit")
    with pytest.raises(InvalidInput, match="cuda_graphs"):
        deeppcr.Config(backend="eager", cuda_graphs=True)
    with pytest.raises(InvalidInput, match="check_every"):
        deeppcr.Config(check_every=0)
    chain = CHAINS["tanh"]
    res = _solve(chain, "full", "inductor", cuda_graphs=True)
    assert res.stats.backend == "inductor"
    _close(res.states, chain.sequential(), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("mode", ["full", "diag"])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("chunk", [0, 5])
def test_traceable_scan_matches_the_eager_scan(mode, transpose, chunk):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(23, 2, 3, 3, dtype=torch.float64, generator=g) * 0.5
    A = A if mode == "full" else A[..., 0]
    r = torch.randn(23, 2, 3, dtype=torch.float64, generator=g)
    want = scan.affine_scan(A, r, mode, transpose=transpose, chunk=0)
    torch.testing.assert_close(fused_scan.scan(A, r, mode, transpose, chunk), want)


@pytest.mark.parametrize("mode", ["full", "diag"])
@pytest.mark.parametrize("length", [1, 2, 3, 5, 8, 23, 64, 97])
@pytest.mark.parametrize("plain", ["pcr", "cyclic_reduction"])
def test_plain_scans_match_the_sequential_recurrence_and_never_read_row_0(mode, length, plain):
    g = torch.Generator().manual_seed(length)
    A = torch.randn(length, 2, 3, 3, dtype=torch.float64, generator=g) * 0.6
    A = A if mode == "full" else A[..., 0]
    r = torch.randn(length, 2, 3, dtype=torch.float64, generator=g)
    want, z = [], torch.zeros_like(r[0])
    for l in range(length):  # delta_l = A_l delta_{l-1} + r_l, delta_{-1} = 0
        z = r[l] + (A[l] @ z.unsqueeze(-1)).squeeze(-1) if mode == "full" else r[l] + A[l] * z
        want.append(z)
    A = A.clone()
    A[0] = float("nan")  # row 0's map multiplies the zero vector before the chain: never read
    got = getattr(fused_scan, plain)(A, r, mode_of(mode))
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-12, atol=1e-12)


def test_compiled_functions_are_called_without_dynamo(monkeypatch):
    """The compiled iteration is inductor's generated code called directly: no TorchDynamo frame, guard
    or AOT wrapper per call (and ``torch.compile`` is never reached)."""
    from torch._dynamo.utils import counters

    def refuse(*args, **kwargs):
        raise AssertionError("torch.compile called")

    monkeypatch.setattr(torch, "compile", refuse)
    fresh = PROBLEMS["tanh"](L)  # a new step object: compiled here (inductor's on-disk cache may hold it)
    frames = dict(counters["frames"])
    res = _solve(fresh, "full", "inductor")
    assert res.stats.backend == "inductor", res.stats.backend_error
    _close(res.states, fresh.sequential(), rtol=1e-9, atol=1e-9)
    entries = [e for (_, key), e in backend._CACHE[fresh.step].items() if key[0] == "newton"]
    # on CPU the iteration is rowloop's C++ row loop plus the compiled rest (a DirectCall too)
    assert entries and all(isinstance(getattr(e.fn, "graph", e.fn), backend.DirectCall) for e in entries)
    assert dict(counters["frames"]) == frames  # TorchDynamo evaluated no frame


def test_direct_call_compiles_a_variant_for_other_strides_and_ignores_cuda_graphs_on_cpu():
    def f(x, y):
        return torch.tanh(x @ y) + x  # one output: returned as the tensor itself

    x, y = torch.randn(3, 3, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    call = backend.compile_traced(f, (x, y), cuda_graphs=True)
    assert not call.cuda_graphs  # CPU inputs: no CUDA graph
    torch.testing.assert_close(call(x, y), f(x, y))
    xt = torch.randn(3, 3, dtype=torch.float64).t()  # same shape, other strides
    torch.testing.assert_close(call(xt, y), f(xt, y))
    assert len(call.variants) == 2
    torch.testing.assert_close(call(x, y), f(x, y))  # the first compile still serves its strides
