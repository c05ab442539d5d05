"""Host syncs per solve: every ``.item()``, ``bool(tensor)``, ``float``/``int`` of a tensor and ``.tolist()``
waits for the device. The compiled backend decides on the device and reads its flags once every
``check_every`` iterations plus once at the end; this test counts them on CPU (where a sync is free,
but the count is the same as on CUDA) by wrapping those Tensor methods."""
import math

import pytest
import torch

import deeppcr_fx as deeppcr
from chains import PROBLEMS

SYNCING = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")
CHAIN = PROBLEMS["tanh"](48, w=3, B=2)


@pytest.fixture
def syncs(monkeypatch):
    counts = {name: 0 for name in SYNCING}
    for name in SYNCING:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            counts[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


def _solve(backend, **kw):
    return deeppcr.solve(CHAIN.step, CHAIN.x0, per_step=CHAIN.per_step, jacobian="full", backend=backend, **kw)


@pytest.mark.parametrize("check_every", [1, 3])
def test_compiled_backend_syncs_once_per_check_and_once_at_the_end(syncs, check_every):
    _solve("inductor", check_every=check_every)  # compile outside the count
    for name in syncs:
        syncs[name] = 0
    res = _solve("inductor", check_every=check_every)
    assert res.stats.backend == "inductor" and res.stats.converged
    its = res.stats.iterations
    total = sum(syncs.values())
    # checks: ceil(its / k), the iterations after convergence up to the next check are no-ops
    assert total <= math.ceil(its / check_every) + 1, (its, syncs)
    torch.testing.assert_close(res.states, CHAIN.sequential(), rtol=1e-9, atol=1e-9)


def test_eager_backend_syncs_a_few_times_per_iteration(syncs):
    res = _solve("eager")
    its = res.stats.iterations
    assert sum(syncs.values()) <= 3 * its + 2, (its, syncs)  # the reference: 2 per iteration
