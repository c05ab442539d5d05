"""Gradients of deeppcr.solve against autograd of the sequential loop (gradcheck in float64)."""
import pytest
import torch

import deeppcr_fx as deeppcr
from chains import PROBLEMS

MODES = ["full", "diag", "identity", "zero"]


def _flat(x):
    return torch.cat([t.reshape(-1) for t in x]) if isinstance(x, tuple) else x.reshape(-1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("problem", ["tanh", "residual", "ddim", "tuple"])
def test_gradcheck(problem, mode):
    chain = PROBLEMS[problem](5, w=3, B=2)
    x0 = tuple(t.clone().requires_grad_() for t in chain.x0) if isinstance(chain.x0, tuple) \
        else chain.x0.clone().requires_grad_()
    per_step = tuple(p.clone().requires_grad_() for p in chain.per_step)
    shared = tuple(s.clone().requires_grad_() for s in chain.shared)
    x0_parts = x0 if isinstance(x0, tuple) else (x0,)

    def f(*args):
        xs = args[:len(x0_parts)]
        ps = args[len(x0_parts):len(x0_parts) + len(per_step)]
        sh = args[len(x0_parts) + len(per_step):]
        x = xs if isinstance(x0, tuple) else xs[0]
        return _flat(deeppcr.solve(chain.step, x, per_step=ps, shared=sh, jacobian=mode).states)

    assert torch.autograd.gradcheck(f, (*x0_parts, *per_step, *shared))


# the compiled backend on diag (compiled forward, eager adjoint); its full-mode adjoint is compiled in
# test_shared_tensor_gradient_is_summed_over_steps and tests/test_fused.py (each signature costs a compile)
@pytest.mark.parametrize("mode,backend", [(m, "eager") for m in MODES] + [("diag", "inductor")])
def test_gradients_match_sequential_autograd_with_intermediate_states(mode, backend):
    chain = PROBLEMS["tanh"](64, dtype=torch.float64)
    W, b = (p.clone().requires_grad_() for p in chain.per_step)
    x0 = chain.x0.clone().requires_grad_()
    weights = torch.randn(64, *chain.x0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def loss(states):  # reads every z_l, not only z_L
        return (weights * states).sum() + states[10].pow(2).sum()

    res = deeppcr.solve(chain.step, x0, per_step=(W, b), jacobian=mode, backend=backend)
    assert res.stats.backend == backend, res.stats.backend_error
    grads = torch.autograd.grad(loss(res.states), (x0, W, b))
    expected = torch.autograd.grad(loss(chain.sequential(x0=x0, per_step=(W, b))), (x0, W, b))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-10)
    assert res.stats.backward is not None and res.stats.backward.jacobian == mode


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_shared_tensor_gradient_is_summed_over_steps(backend):
    chain = PROBLEMS["ddim"](30)
    Wd = chain.shared[0].clone().requires_grad_()
    res = deeppcr.solve(chain.step, chain.x0, per_step=chain.per_step, shared=(Wd,), backend=backend)
    assert res.stats.backend == backend, res.stats.backend_error
    (g,) = torch.autograd.grad(res.states[-1].sum(), Wd)
    (e,) = torch.autograd.grad(chain.sequential(shared=(Wd,))[-1].sum(), Wd)
    torch.testing.assert_close(g, e)


def test_only_requested_gradients_and_unused_outputs():
    chain = PROBLEMS["tuple"](9)
    W = chain.per_step[0].clone().requires_grad_()
    res = deeppcr.solve(chain.step, chain.x0, per_step=(W, chain.per_step[1]))
    h, c = res.states
    (g,) = torch.autograd.grad(h[-1].sum(), W)  # c's gradient is None: counts as zero
    (e,) = torch.autograd.grad(chain.sequential(per_step=(W, chain.per_step[1]))[0][-1].sum(), W)
    torch.testing.assert_close(g, e)


def test_bfloat16_gradients_follow_the_sequential_model():
    chain = PROBLEMS["tanh"](16, dtype=torch.bfloat16)
    W = chain.per_step[0].clone().requires_grad_()
    res = deeppcr.solve(chain.step, chain.x0, per_step=(W, chain.per_step[1]))
    (g,) = torch.autograd.grad(res.states[-1].float().sum(), W)
    (e,) = torch.autograd.grad(chain.sequential(per_step=(W, chain.per_step[1]))[-1].float().sum(), W)
    assert g.dtype == torch.bfloat16
    torch.testing.assert_close(g.float(), e.float(), rtol=5e-2, atol=5e-2)


def test_double_backward_raises_clear_error():
    chain = PROBLEMS["tanh"](4)
    x0 = chain.x0.clone().requires_grad_()
    res = deeppcr.solve(chain.step, x0, per_step=chain.per_step)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(res.states.sum(), x0, create_graph=True)
