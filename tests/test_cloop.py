"""The sequential finish as one generated C++ loop (runtime/cloop.py, cloop_codegen.py) against the plain
eager loop: the generator's op set on real step graphs, float32 and float64, B = 1 and B > 1, per-step and
shared inputs, tuple states, the fallback for a step outside the op set, and the loop inside a solve."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

import deeppcr_fx as deeppcr
from chains import PROBLEMS, Chain
from deeppcr_fx.runtime import backend, cloop, fused_solve
from deeppcr_fx.runtime.cloop_codegen import Ref, StepCodegen, Unsupported
from deeppcr_fx.runtime.cloop_views import view_strides
from deeppcr_fx.runtime.state import StateSpec

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def gru(L, n=4, B=1, dtype=torch.float64, seed=4, aten=False) -> Chain:
    """A GRU cell over time: per-step inputs x_t, shared weights (``torch.gru_cell``'s equations; with
    ``aten`` the op itself, whose decomposition updates slices of intermediates in place)."""
    g = torch.Generator().manual_seed(seed)
    w_ih, w_hh = ((torch.randn(3 * n, n, generator=g) / n ** 0.5).to(dtype) for _ in range(2))
    b_ih, b_hh = ((torch.randn(3 * n, generator=g) * 0.1).to(dtype) for _ in range(2))
    xs = torch.randn(L, B, n, generator=g).to(dtype)

    def step(h, x, w_ih, w_hh, b_ih, b_hh):
        i_r, i_z, i_n = F.linear(x, w_ih, b_ih).chunk(3, -1)
        h_r, h_z, h_n = F.linear(h, w_hh, b_hh).chunk(3, -1)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        c = torch.tanh(i_n + r * h_n)
        return c + z * (h - c)

    cell = (lambda h, x, *w: torch.ops.aten.gru_cell(x, h, *w)) if aten else step
    return Chain("gru", cell, torch.randn(B, n, generator=g).to(dtype), (xs,), (w_ih, w_hh, b_ih, b_hh))


def zoo(L, n=4, B=3, dtype=torch.float64, seed=5) -> Chain:
    """Many ops in one step: activations, reductions (mean, var, softmax), views, cat, bmm, where."""
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(L, n, n, generator=g) / n ** 0.5).to(dtype)
    M = (torch.randn(2, n, n, generator=g) / n ** 0.5).to(dtype)

    def step(z, W, M):
        y = z @ W.T
        a = (F.silu(y) + F.gelu(y) + F.softplus(y) + torch.clamp(y, -0.5, 0.5) + y.abs().sqrt() + torch.exp(-y)
             + torch.log1p(y * y) + y ** 3 + torch.rsqrt(y * y + 1) + F.elu(y) + F.leaky_relu(y) + torch.sin(y)
             + torch.cos(y) / 3 + torch.maximum(y, z) + torch.relu(y) + F.layer_norm(y, (n,)) + F.softmax(y, -1)
             + torch.atan(y) + torch.erf(y) + F.hardtanh(y) - y.mean(0, keepdim=True) + y.amax(-1, keepdim=True))
        a = a + y.var(-1, keepdim=True) + torch.cat([a[1:], a[:1]], 0) + a.flip(0)  # slices and cat along dim 0
        a = a + torch.add(y, z, alpha=0.5) - torch.sub(y, z, alpha=2) + torch.rsub(y, 1.5)  # alpha, scalar first
        a = a + torch.full((B, n), 0.25, dtype=z.dtype) * torch.scalar_tensor(0.5, dtype=z.dtype)
        pair = torch.stack([a[:, :n // 2], a[:, n // 2:]]).transpose(1, 2)  # (2, n/2, B)
        mixed = torch.bmm(M[:, :n // 2, :n // 2], pair).transpose(1, 2)  # (2, B, n/2)
        b = torch.cat([mixed[0], mixed[1]], dim=-1).reshape(B, n)
        zz = torch.cat([z[:, 2:], z[:, :2]], -1).unsqueeze(0).expand(2, B, n)[1]
        return torch.tanh(0.1 * torch.where(b > 0, b, 0.5 * b) + 0.5 * zz)

    return Chain("zoo", step, torch.randn(B, n, generator=g).to(dtype), (W,), (M,))


def lstm(L, dtype, B):
    return PROBLEMS["tuple"](L, dtype=dtype, B=B)


CASES = {  # name: (chain factory, dtype, B)
    "tanh-f64-B2": (lambda L, d, B: PROBLEMS["tanh"](L, dtype=d, B=B), torch.float64, 2),
    "tanh-f32-B1": (lambda L, d, B: PROBLEMS["tanh"](L, dtype=d, B=B), torch.float32, 1),
    "residual-f64-B1": (lambda L, d, B: PROBLEMS["residual"](L, dtype=d, B=B), torch.float64, 1),
    "residual-f32-B16": (lambda L, d, B: PROBLEMS["residual"](L, w=8, dtype=d, B=B), torch.float32, 16),
    "gru-f64-B1": (lambda L, d, B: gru(L, dtype=d, B=B), torch.float64, 1),
    "gru-f32-B3": (lambda L, d, B: gru(L, n=2, dtype=d, B=B), torch.float32, 3),
    "lstm-tuple-f64-B2": (lstm, torch.float64, 2),
    "lstm-tuple-f32-B1": (lstm, torch.float32, 1),
    "aten-gru-cell-f32-B2": (lambda L, d, B: gru(L, n=3, dtype=d, B=B, aten=True), torch.float32, 2),  # in-place ops
    "ddim-shared-f64": (lambda L, d, B: PROBLEMS["ddim"](L, dtype=d, B=B), torch.float64, 3),
    "zoo-f64-B3": (lambda L, d, B: zoo(L, dtype=d, B=B), torch.float64, 3),
}


def _flat_sequential(chain: Chain, spec: StateSpec, x0=None) -> torch.Tensor:
    with torch.no_grad():
        return spec.flatten(chain.sequential(x0=x0), lead=1)


@pytest.mark.parametrize("name", list(CASES))
def test_loop_matches_the_eager_sequential_loop(name):
    make, dtype, B = CASES[name]
    chain = make(40, dtype, B)
    spec = StateSpec.of(chain.x0, None)
    x0 = spec.flatten(chain.x0)
    loop = cloop.compile_loop(chain.step, spec, chain.per_step, chain.shared, x0)
    want = _flat_sequential(chain, spec)
    U = torch.full_like(want, math.nan)
    loop(0, U, x0, chain.per_step, chain.shared)
    torch.testing.assert_close(U, want, **TOL[dtype])
    U2 = want.clone()  # from the middle: rows before start are read (z = U[start - 1]), not written
    U2[17:] = math.nan
    loop(17, U2, torch.full_like(x0, math.nan), chain.per_step, chain.shared)
    torch.testing.assert_close(U2, want, **TOL[dtype])


def test_non_finite_values_propagate_as_in_eager():
    """Each column goes through one op only, so a NaN stays where eager keeps it (relu, max, min, clamp)."""
    g = torch.Generator().manual_seed(6)
    c = torch.randn(12, 5, generator=g, dtype=torch.float64)

    def step(z, c):
        z = z + c
        return torch.cat([torch.relu(z[:, :1]), torch.maximum(z[:, 1:2], 0.5 * z[:, 1:2]), torch.minimum(
            z[:, 2:3], -z[:, 2:3]), torch.clamp(z[:, 3:4], -1, 1), torch.tanh(z[:, 4:])], -1)

    x0 = torch.randn(5, 5, generator=g, dtype=torch.float64)
    for i, j in enumerate(range(5)):
        x0[i, j] = math.nan
    x0[1, 0], x0[0, 1] = math.inf, -math.inf  # relu and maximum keep them
    chain = Chain("nan", step, x0, (c,))
    spec = StateSpec.of(chain.x0, None)
    loop = cloop.compile_loop(chain.step, spec, chain.per_step, chain.shared, x0)
    want = _flat_sequential(chain, spec)
    U = torch.zeros_like(want)
    loop(0, U, x0, chain.per_step, chain.shared)
    assert want.isnan().sum() == 5 * 12 and want.isinf().any()
    torch.testing.assert_close(U, want, equal_nan=True, **TOL[torch.float64])


def test_view_strides_follow_torch():
    base = torch.arange(24.).reshape(2, 3, 4)
    for t in (base, base.permute(2, 0, 1), base[:, 1:], base.transpose(0, 1)):
        for shape in ((24,), (6, 4), (2, 12), (4, 6), (2, 3, 2, 2), (1, 24, 1)):
            try:
                want = t.view(shape).stride()
            except RuntimeError:
                want = None
            assert view_strides(tuple(t.shape), t.stride(), list(shape)) == want, (t.stride(), shape)


def test_an_op_outside_the_set_is_refused_with_the_reason():
    chain = PROBLEMS["tanh"](8)
    step = lambda z, W, b: torch.cumsum(torch.tanh(F.linear(z, W, b)), -1)  # noqa: E731
    spec = StateSpec.of(chain.x0, None)
    with pytest.raises(Unsupported, match="cumsum"):
        cloop.compile_loop(step, spec, chain.per_step, (), spec.flatten(chain.x0))
    big = torch.zeros(8, 200, 200, dtype=torch.float64)  # a (200, 200) intermediate per step: over the limit
    with pytest.raises(Unsupported, match="exceed"):
        cloop.compile_loop(lambda z, A: z + (A @ A).sum(), spec, (big,), (), spec.flatten(chain.x0))
    def overlapping(z):  # in place over a shifted view of itself (make_fx without functionalize keeps add_)
        t = z * 1
        t[:, 1:].add_(t[:, :-1])
        return t

    gm = make_fx(overlapping)(torch.zeros(2, 3))
    with pytest.raises(Unsupported, match="overlap"):
        StepCodegen(gm, [Ref("z", torch.float32, (2, 3), (3, 1), writable=False)],
                    Ref("o", torch.float32, (2, 3), (3, 1)))
    with pytest.raises(Unsupported, match="in-place"):  # writing into an input
        StepCodegen(backend.trace(lambda z: z.add_(1), (torch.zeros(2, 2),)),
                    [Ref("z", torch.float32, (2, 2), (2, 1), writable=False)], Ref("o", torch.float32, (2, 2), (2, 1)))


L = 40


def _solve(step, chain, **kw):
    # identity mode: the cheapest iteration to compile; one iteration, then the sequential finish
    return deeppcr.solve(step, chain.x0, per_step=chain.per_step, shared=chain.shared, jacobian="identity",
                         backend="inductor", max_iter=1, **kw)


def test_solve_finishes_with_the_loop():
    chain = PROBLEMS["tanh"](L)
    res = _solve(chain.step, chain)
    f = res.stats.forward
    assert res.stats.backend == "inductor" and f.sequential_from is not None and f.sequential_from < L - 16
    assert f.finish_backend == "cloop" and f.finish_error is None
    entries = [e for (_, key), e in backend._CACHE[chain.step].items() if key[0] == "cloop"]
    assert len(entries) == 1 and isinstance(entries[0].fn, cloop.SequentialLoop)
    torch.testing.assert_close(res.states, chain.sequential(), rtol=1e-12, atol=1e-12)


def test_solve_with_a_step_outside_the_op_set_finishes_with_inductor_chunks():
    chain = PROBLEMS["tanh"](L)
    step = lambda z, W, b: torch.tanh(torch.cumsum(F.linear(z, W, b), -1) * 0.5)  # noqa: E731
    res = _solve(step, chain)
    f = res.stats.forward
    assert res.stats.backend == "inductor" and f.sequential_from is not None and f.sequential_from < L - 16
    assert f.finish_backend == "inductor" and "cumsum" in f.finish_error
    torch.testing.assert_close(res.states, Chain("c", step, chain.x0, chain.per_step).sequential(),
                               rtol=1e-12, atol=1e-12)


def test_a_short_tail_runs_the_loop_once_it_is_compiled_and_eagerly_before(monkeypatch):
    chain = PROBLEMS["tanh"](L)
    step = lambda z, W, b: torch.tanh(F.linear(z, W, b))  # noqa: E731 - its own cache entries
    monkeypatch.setattr(fused_solve, "finish_chunk", lambda length: 2 * length)  # every finish is short
    assert _solve(step, chain).stats.forward.finish_backend == "eager"  # not worth compiling a loop for
    monkeypatch.undo()
    assert _solve(step, chain).stats.forward.finish_backend == "cloop"  # a long finish compiles it
    monkeypatch.setattr(fused_solve, "finish_chunk", lambda length: 2 * length)
    res = _solve(step, chain)
    assert res.stats.forward.finish_backend == "cloop"  # the short one now runs it too
    torch.testing.assert_close(res.states, Chain("c", step, chain.x0, chain.per_step).sequential(),
                               rtol=1e-12, atol=1e-12)
