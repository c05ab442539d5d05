"""The compiled iteration on CUDA (skipped without a GPU): Triton kernels, with and without CUDA graphs,
against the sequential loop; host syncs per solve bounded as on the CPU (tests/test_host_syncs.py)."""
import math

import pytest
import torch

import deeppcr_fx as deeppcr
from chains import PROBLEMS

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CHAIN = PROBLEMS["tanh"](300, w=4, B=2)


def _solve(**kw):
    per_step = tuple(p.cuda() for p in CHAIN.per_step)
    return deeppcr.solve(CHAIN.step, CHAIN.x0.cuda(), per_step=per_step, jacobian="full", backend="inductor", **kw)


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_compiled_iteration_on_cuda_matches_sequential(cuda_graphs):
    res = _solve(cuda_graphs=cuda_graphs)
    assert res.stats.backend == "inductor", res.stats.backend_error
    assert res.stats.converged
    torch.testing.assert_close(res.states.cpu(), CHAIN.sequential(), rtol=1e-9, atol=1e-9)


def test_host_syncs_on_cuda(monkeypatch):
    _solve(check_every=4)
    count = [0]
    original = torch.Tensor.tolist

    def counted(self):
        count[0] += 1
        return original(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    res = _solve(check_every=4)
    assert count[0] <= math.ceil(res.stats.iterations / 4) + 1
