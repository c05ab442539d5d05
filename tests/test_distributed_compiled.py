"""The layer-parallel solve with the compiled backend (runtime/distributed_fused.py and
distributed_fused_adjoint.py), CPU, gloo, 2 processes.

Each case is solved with ``backend="eager"`` and ``backend="inductor"`` on both ranks: states and
gradients equal the sequential loop and the eager distributed solve (float64, 1e-10), stats agree
between ranks, and the compiled solve really ran compiled. Small chains (compile time is CI time).
The fallback case: the step's trace fails on rank 1 only, so every rank must run eagerly and say why.
"""
from __future__ import annotations

import pytest
import torch.distributed as dist

from distributed_helpers import spawn_group

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

TOL = 1e-10

CASES = [
    # three solves: the first compiles, the second runs on the setup exchange's vote alone, before the
    # third rank 1 drops its compiled functions (its vote fails, the agreement's exchange rebuilds them)
    ("tanh_full", "tanh", 24, [0, 9, 24], {"jacobian": "full", "again": 2, "forget_on": 1}),
    ("gru", "gru", 20, [0, 12, 20], {}),
    ("fallback", "tanh", 16, [0, 7, 16], {"jacobian": "full", "closure_on": 1}),
    # samples coupled within a step: the compiled adjoint's check fails on every rank, the eager one iterates
    ("coupled", "coupled", 12, [0, 5, 12], {"rtol": 1e-12, "adjoint_rtol": 1e-12}),
]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    # a generous timeout: a rank that compiles waits for the other at the agreement
    return spawn_group("run_compiled_cases", 2, tmp_path_factory.mktemp("compiled"), CASES, timeout_s=600.0)


def _check(results, key):
    for rank, case in enumerate(results):
        out = case[key]
        assert out["states"] < TOL and out["per_step_grads"] < TOL and out["shared_grads"] < TOL, (rank, out)
        if rank == 0:
            assert out["x0_grad"] < TOL
        assert out["vs_eager"] < TOL, (rank, out["vs_eager"])
        assert out["stats"] == results[0][key]["stats"], f"stats differ between rank 0 and rank {rank}"
    return results[0][key]["stats"]


@pytest.mark.parametrize("key", ["tanh_full", "gru"])
def test_compiled_matches_eager_and_sequential(two, key):
    stats = _check(two, key)
    assert stats["backend"] == "inductor" and stats["forward"]["backend"] == "inductor", stats
    assert stats["backend_error"] is None
    eager = two[0][key]["eager_stats"]
    assert stats["forward"]["converged"] and eager["forward"]["converged"]
    assert stats["forward"]["iterations"] == eager["forward"]["iterations"]
    assert stats["backward"]["backend"] == "inductor" and stats["backward"]["iterations"] == 1


def test_backend_vote_in_the_setup_exchange(two):
    """A repeated compiled solve on the same layout takes no agreement exchange (the setup exchange carries
    the vote, the adjoint's scan exchange its flag); where one rank lost its compiled functions, every rank
    takes the agreement's exchange."""
    for rank, case in enumerate(two):
        first, repeat, after_forget, backward = case["tanh_full"]["gathers"]
        assert "backend agreement" in first, (rank, first)
        assert repeat[0] == "setup" and not any(w.startswith("backend") for w in repeat), (rank, repeat)
        assert len(repeat) == case["tanh_full"]["stats"]["forward"]["iterations"] + 1, (rank, repeat)
        assert "backend agreement" in after_forget, (rank, after_forget)
        # rank 1 lacks the adjoint's functions too: the scan exchange flags it, the group builds, exchanges again
        assert backward == ["adjoint scan", "adjoint scan", "adjoint check"], (rank, backward)
    assert two[0]["tanh_full"]["stats"]["forward"]["backend"] == "inductor"


def test_adjoint_check_failure_falls_back_to_eager(two):
    stats = _check(two, "coupled")
    assert stats["forward"]["backend"] == "inductor"
    assert stats["backward"]["backend"] == "eager" and stats["backward"]["iterations"] > 1


def test_compile_failure_on_one_rank_falls_back_everywhere(two):
    stats = _check(two, "fallback")
    assert stats["backend"] == "eager" and stats["forward"]["backend"] == "eager"
    assert stats["backend_error"].startswith("rank 1: ValueError"), stats["backend_error"]
    assert "closes over" in stats["backend_error"]


@pytest.mark.parametrize("mode_name", ["full", "diag"])
@pytest.mark.parametrize("length,chunk", [(13, 4), (16, 4), (9, 0), (7, 16)])
def test_scan_products_and_propagate_match_a_loop(mode_name, length, chunk):
    """The last rank's early scan (distributed_products.scan_products / propagate), incl. the chunked path
    that only slices of 8192+ steps take in a solve: rows for a zero input plus Phi_l x equal the loop
    z_l = A_l z_{l-1} + r_l from z_{-1} = x."""
    import torch
    from deeppcr_fx.runtime.distributed_products import propagate, scan_products
    from deeppcr_fx.runtime.modes import mode_of

    mode = mode_of(mode_name)
    g = torch.Generator().manual_seed(length + chunk)
    B, n = 2, 3
    shape = (length, B, n, n) if mode_name == "full" else (length, B, n)
    A = torch.randn(shape, generator=g, dtype=torch.float64) * 0.7
    r = torch.randn(length, B, n, generator=g, dtype=torch.float64)
    x = torch.randn(B, n, generator=g, dtype=torch.float64)
    d, P, Q = scan_products(A, r, mode, chunk)
    got = d + propagate(P, Q, x, mode, length)
    z, want = x, []
    for l in range(length):
        z = mode.apply(A[l], z) + r[l]
        want.append(z)
    assert (got - torch.stack(want)).abs().max() < 1e-12
