"""The runtime on CUDA tensors (skipped without a GPU): same answers and gradients as on the CPU."""
import pytest
import torch

import deeppcr_fx as deeppcr
from chains import PROBLEMS

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _to(x, device):
    return tuple(t.to(device) for t in x) if isinstance(x, tuple) else x.to(device)


@pytest.mark.parametrize("mode", ["full", "diag", "identity", "zero"])
@pytest.mark.parametrize("problem", ["tanh", "residual", "tuple"])
def test_solve_and_gradients_on_cuda(problem, mode):
    chain = PROBLEMS[problem](300, dtype=torch.float64)
    x0 = _to(chain.x0, "cuda")
    per_step = tuple(p.to("cuda").requires_grad_() for p in chain.per_step)
    res = deeppcr.solve(chain.step, x0, per_step=per_step, jacobian=mode)
    states = res.states if isinstance(res.states, tuple) else (res.states,)
    assert all(s.device.type == "cuda" for s in states)
    ref = chain.sequential()
    ref = ref if isinstance(ref, tuple) else (ref,)
    for s, e in zip(states, ref):
        torch.testing.assert_close(s.cpu(), e, rtol=1e-9, atol=1e-9)
    grads = torch.autograd.grad(sum(s.sum() for s in states), per_step)
    cpu_per_step = tuple(p.clone().requires_grad_() for p in chain.per_step)
    seq = chain.sequential(per_step=cpu_per_step)
    seq = seq if isinstance(seq, tuple) else (seq,)
    expected = torch.autograd.grad(sum(s.sum() for s in seq), cpu_per_step)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g.cpu(), e, rtol=1e-8, atol=1e-9)


def test_bfloat16_on_cuda():
    chain = PROBLEMS["tanh"](64, dtype=torch.bfloat16)
    res = deeppcr.solve(chain.step, chain.x0.cuda(), per_step=_to(chain.per_step, "cuda"))
    assert res.states.dtype == torch.bfloat16 and res.stats.compute_dtype == "float32"
    torch.testing.assert_close(res.states.cpu().float(), chain.sequential().float(), rtol=3e-2, atol=3e-2)
