"""``Config(flush_denormals=True)``: the same answers (gradients included) as without, and the thread's
denormal setting after a solve is the one before it (``runtime/denormals.py``)."""
import pytest
import torch

import deeppcr_fx as deeppcr
from deeppcr_fx.runtime import denormals

L, W_ = 40, 4


def _step(z, W, b):
    return torch.tanh(torch.nn.functional.linear(z, W, b))


def _run(backend_name, flush, max_iter=None):
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(L, W_, W_, generator=g) / W_ ** 0.5).requires_grad_()  # gain ~1: Jacobian products underflow
    b = (torch.randn(L, W_, generator=g) * 0.1).requires_grad_()
    x0 = torch.randn(2, W_, generator=g).requires_grad_()
    res = deeppcr.solve(_step, x0, per_step=(W, b), jacobian="full", backend=backend_name, max_iter=max_iter,
                        flush_denormals=flush)
    grads = torch.autograd.grad(res.states.sin().sum(), (x0, W, b))
    return res, (res.states.detach(), *grads)


def test_the_probe_reads_the_setting():
    assert not denormals.flushing()
    try:
        assert torch.set_flush_denormal(True) is False or denormals.flushing()
    finally:
        torch.set_flush_denormal(False)
    assert not denormals.flushing()


@pytest.mark.parametrize("backend_name,max_iter", [("eager", None), ("eager", 2), ("inductor", 2)])
@pytest.mark.parametrize("before", [False, True])
def test_flushing_gives_the_same_answers_and_restores_the_setting(backend_name, max_iter, before):
    ref_res, ref = _run(backend_name, False, max_iter)
    try:
        supported = torch.set_flush_denormal(before)
        res, got = _run(backend_name, True, max_iter)
        assert denormals.flushing() == (before and supported)  # the setting before the solve, forward and backward
    finally:
        torch.set_flush_denormal(False)
    if backend_name == "inductor":
        assert res.stats.backend == "inductor" and res.stats.backward.backend == "inductor", res.stats.backend_error
    if max_iter is not None:
        assert res.stats.sequential_finish is not None  # the finish ran inside the bracket too
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_flushing_inside_the_solve():
    seen = []

    def step(z, W, b):
        seen.append(denormals.flushing())
        return _step(z, W, b)

    W, b, x0 = torch.randn(8, W_, W_), torch.randn(8, W_), torch.randn(1, W_)
    deeppcr.solve(step, x0, per_step=(W, b), backend="eager", vectorize=False, flush_denormals=True)
    assert seen and seen[-1] and not denormals.flushing()
