"""Layer-parallel deeppcr.solve(..., group=...) across processes (CPU, gloo): issue 15.

Each group of processes is spawned once (module-scoped fixtures) and runs several cases;
the tests check what the ranks wrote back. States and gradients are compared with the
single-process sequential loop in float64.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from distributed_helpers import spawn_group

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

TOL = 1e-10

CASES_2 = [
    ("tanh_full", "tanh", 32, [0, 16, 32], {"jacobian": "full"}),
    ("tanh_diag", "tanh", 24, [0, 10, 24], {"jacobian": "diag"}),  # max_iter: the sequential finish across ranks
    ("tanh_identity", "tanh", 16, [0, 8, 16], {"jacobian": "identity"}),
    ("tanh_zero", "tanh", 16, [0, 5, 16], {"jacobian": "zero"}),
    ("tanh_full_L64", "tanh", 64, [0, 32, 64], {"jacobian": "full"}),
    ("tanh_cap", "tanh", 32, [0, 16, 32], {"jacobian": "full", "max_iter": 3}),
    ("residual_uneven", "residual", 32, [0, 5, 32], {}),
    ("gru", "gru", 24, [0, 12, 24], {}),
    ("gru_diag", "gru", 16, [0, 7, 16], {"jacobian": "diag", "rtol": 1e-12, "adjoint_rtol": 1e-12}),  # default rtol: 2e-10 off, as in one process
    ("tuple", "tuple", 16, [0, 9, 16], {}),
    ("shared_length", "shared", 20, [0, 7, 20], {"rtol": 1e-12, "adjoint_rtol": 1e-12}),  # no per-step tensors: length= per rank
    ("warm", "tanh", 32, [0, 12, 32], {"warm": True}),  # initial_guess = the previous solution
    ("frozen", "gru", 16, [0, 8, 16], {"frozen": True}),  # rank 1 has nothing to differentiate
    ("coupled", "coupled", 24, [0, 11, 24], {"rtol": 1e-12, "adjoint_rtol": 1e-12}),  # approximate J: the adjoint is iterated
]
CASES_3 = [
    ("tanh_uneven", "tanh", 40, [0, 1, 31, 40], {}),
    ("residual", "residual", 30, [0, 10, 20, 30], {"jacobian": "identity", "rtol": 1e-12, "adjoint_rtol": 1e-12}),
    ("gru", "gru", 18, [0, 6, 13, 18], {}),
    ("tuple", "tuple", 15, [0, 4, 9, 15], {"jacobian": "diag", "rtol": 1e-12, "adjoint_rtol": 1e-12}),
]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Two processes: CASES_2, then the fault cases (the last one kills rank 1)."""
    out_dir = tmp_path_factory.mktemp("two")
    return spawn_group("run_cases_then_faults", 2, out_dir, CASES_2, str(out_dir), timeout_s=15.0)


SUB_CASES_3 = [("subgroup", "gru", 12, [0, 5, 12], {})]  # a group of global ranks 1, 2: x0 read on rank 1


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    return spawn_group("run_cases", 3, tmp_path_factory.mktemp("three"), CASES_3, SUB_CASES_3, True)


def _check(results, key):
    for rank, out in enumerate(results):
        case = out[key]
        assert case["states"] < TOL, (rank, case["states"])
        assert case["per_step_grads"] < TOL, (rank, case["per_step_grads"])
        assert case["shared_grads"] < TOL, (rank, case["shared_grads"])
        if rank == 0:
            assert case["x0_grad"] < TOL
        assert case["stats"] == results[0][key]["stats"], f"stats differ between rank 0 and rank {rank}"
        lo, hi = case["offsets"][rank], case["offsets"][rank + 1]
        assert case["shape"][0] == hi - lo
        assert case["object_gathers"] == 0  # the setup agreed in one tensor all-gather


@pytest.mark.parametrize("key", [c[0] for c in CASES_2])
def test_two_processes_match_sequential(two, key):
    _check(two, key)


@pytest.mark.parametrize("key", [c[0] for c in CASES_3])
def test_three_processes_match_sequential(three, key):
    _check(three, key)


def test_subgroup(three):
    """A group that is not WORLD: its first rank (global rank 1) reads x0; global rank 0 is not in it."""
    assert "subgroup" not in three[0]
    _check(three[1:], "subgroup")


def test_model_training_matches_one_process(three):
    """LayerParallel (pre on the first rank, 24 blocks over 3 ranks, head on the last): 10 SGD steps
    give the same losses and parameters as the whole model trained in one process."""
    outs = [out["model"] for out in three]
    assert [o["blocks"] for o in outs] == [(0, 8), (8, 16), (16, 24)]
    for rank, o in enumerate(outs):
        assert o["params"] < TOL, (rank, o["params"])
        assert o["moved"] > 1e-4  # training changed the weights
        assert o["stats"] == outs[0]["stats"]
    assert outs[-1]["losses"] < TOL and outs[0]["losses"] is None


def test_rank_without_trainable_inputs_takes_part(two):
    """Rank 1's inputs do not require grad; its backward still runs (and rank 0's shared gradients
    include rank 1's steps)."""
    assert two[0]["frozen"]["has_grads"] == [True] * 5 and two[1]["frozen"]["has_grads"] == [False] * 5


def test_coupled_samples_iterate_the_adjoint(two):
    """Full mode with approximate per-sample Jacobians: the check across ranks fails, so the adjoint
    is iterated with exact products (more than the single pass) and still matches."""
    backward = two[0]["coupled"]["stats"]["backward"]
    assert backward["iterations"] > 1 and backward["converged"]


def test_warm_start_confirms_in_one_iteration(two):
    stats = two[0]["warm"]["stats"]
    assert stats["warm_start"] and stats["forward"]["iterations"] == 1 and stats["forward"]["converged"]


def test_full_mode_converges_like_one_process(two):
    stats = two[0]["tanh_full"]["stats"]
    assert stats["forward"]["converged"] and stats["forward"]["sequential_finish"] is None
    assert stats["backward"]["converged"] and stats["backward"]["iterations"] == 1
    assert stats["jacobian"] == "full" and stats["length"] == 32


def test_sequential_finish_is_exact_and_global(two):
    for key, cause in (("tanh_cap", "max_iter"), ("tanh_diag", "max_iter")):
        forward = two[0][key]["stats"]["forward"]
        assert forward["sequential_finish"] == cause and not forward["converged"]


def test_communication_does_not_grow_with_length(two):
    """One all-gather per Newton iteration of P (3 + 3 B n) elements with P = 2 (header; last row,
    its step value and the first rank's output map c, B n each; no matrices travel with P = 2),
    plus a second one of the same size in an iteration that did not converge after sending no maps
    or maps of the last Jacobians (distributed_newton's plans). Independent of L."""
    from deeppcr_fx.runtime.newton import COHERENT

    P, B, n = 2, 2, 4
    for key in ("tanh_full", "tanh_full_L64"):
        out = two[0][key]
        forward = out["stats"]["forward"]
        its, worst = forward["iterations"], forward["residuals"]
        assert forward["converged"]
        second = 0
        for i in range(its - 1):  # iterations that did not converge (0-based)
            previous = worst[i - 1] if i >= 1 else float("inf")
            last_plan = i >= 2 and previous ** 3 <= worst[i - 2] ** 2
            second += last_plan or previous <= 1 / COHERENT
        assert out["volume"] == (its + second) * P * (3 + 3 * B * n), (key, out["volume"], its, second)


def test_faults_raise_on_every_rank(two):
    """Layout faults and a failing first step raise the same error everywhere; a step that raises on
    rank 1 mid-solve (evaluation, Jacobians, backward, sequential finish) raises there and a
    PeerFailure on rank 0 at the same exchange; the group stays usable; then rank 1 dies."""
    results = [out["faults"] for out in two]
    for rank, out in enumerate(results):
        for key in ("per_step_mismatch", "x0_mismatch", "options_mismatch"):
            assert out[key]["type"] == "DistributedLayoutError", (rank, key, out[key])
            assert "DeepPCRError" in out[key]["classes"]
        assert "rank 1" in out["per_step_mismatch"]["message"]
        assert out["step_raises"]["type"] == "DistributedSolveError", (rank, out["step_raises"])
        assert "boom on rank 1" in out["step_raises"]["message"]
        assert out["empty_slice"]["type"] == "DistributedSolveError" and "slice of the chain is empty" in \
            out["empty_slice"]["message"]
        for key in ("raises_in_evaluate", "raises_in_jacobian", "raises_in_backward", "raises_in_finish"):
            expected = "ValueError" if rank == 1 else "PeerFailure"  # rank 1's own error; the others a peer's
            assert out[key]["type"] == expected, (rank, key, out[key])
        assert "rank(s) [1]" in out["raises_in_backward"]["message"] or rank == 1
        assert out["after_errors"] < TOL
    dead = results[0]
    for key in ("dead_rank_backward", "dead_rank_solve"):
        assert dead[key]["type"] == "DistributedSolveError", (key, dead[key])
        assert dead[key]["seconds"] < 14.0  # an error, not a hang past the group's timeout


def test_torchrun(tmp_path):
    """The same solve launched by torchrun (env:// rendezvous)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    helpers = os.path.join(os.path.dirname(__file__), "distributed_helpers.py")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           helpers, str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in range(2):
        case = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)["tanh"]
        assert case["states"] < TOL and case["per_step_grads"] < TOL


@pytest.mark.parametrize("mode", ["full", "diag", "identity"])
@pytest.mark.parametrize("m", [1, 2, 7, 16])
def test_reduce_maps_composes_rows_in_order(mode, m):
    """One rank's map (no processes): x -> A_{m-1}(... (A_0 x + r_0) ...) + r_{m-1}."""
    from deeppcr_fx.runtime.distributed_scan import apply, reduce_maps

    g = torch.Generator().manual_seed(m)
    B, n = 3, 4
    A = {"full": torch.randn(m, B, n, n, generator=g, dtype=torch.float64) * 0.5,
         "diag": torch.randn(m, B, n, generator=g, dtype=torch.float64), "identity": None}[mode]
    r = torch.randn(m, B, n, generator=g, dtype=torch.float64)
    x = torch.randn(B, n, generator=g, dtype=torch.float64)
    expected = x
    for j in range(m):
        expected = apply(None if A is None else A[j], expected, mode) + r[j]
    A_tot, c_tot = reduce_maps(A, r, mode)
    assert torch.allclose(apply(A_tot, x, mode) + c_tot, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("mode", ["full", "diag", "identity"])
@pytest.mark.parametrize("m", [1, 2, 5, 127, 128, 300, 1000])
def test_scan_with_propagator_adds_the_input_after_the_scan(mode, m):
    """A rank scans before it knows its input (no processes): d + propagate(x) equals the scan with x
    entering row 0, and (total, d[-1]) is the slice's map, for plain and chunked lengths."""
    from deeppcr_fx.runtime.distributed_scan import apply, scan_with_propagator
    from deeppcr_fx.runtime.scan import affine_scan

    g = torch.Generator().manual_seed(m)
    B, n = 3, 4
    A = {"full": torch.randn(m, B, n, n, generator=g, dtype=torch.float64) * 0.4,
         "diag": torch.randn(m, B, n, generator=g, dtype=torch.float64), "identity": None}[mode]
    r = torch.randn(m, B, n, generator=g, dtype=torch.float64)
    x = torch.randn(B, n, generator=g, dtype=torch.float64)
    d, propagate, total = scan_with_propagator(A, r, mode)
    r_in = r.clone()
    r_in[0] += apply(None if A is None else A[0], x, mode)
    expected = affine_scan(A, r_in, mode, chunk=0)
    scale = expected.abs().max()
    assert ((d + propagate(x)) - expected).abs().max() <= 1e-12 * scale
    assert (apply(total, x, mode) + d[-1] - expected[-1]).abs().max() <= 1e-12 * scale


def test_packing_fold_hands_on_the_updated_last_row():
    """The fold every rank runs on the gathered rows (no processes), P = 3 with a middle rank: the input
    of each position and the last rows they hand on, for a window that starts on the first rank."""
    from deeppcr_fx.runtime.distributed_scan import Packing, apply, fold, local_maps

    g = torch.Generator().manual_seed(3)
    B, n, lengths = 2, 3, [4, 5, 3]
    A = torch.randn(12, B, n, n, generator=g, dtype=torch.float64) * 0.5
    r = torch.randn(12, B, n, generator=g, dtype=torch.float64)
    U_last = [torch.randn(B, n, generator=g, dtype=torch.float64) for _ in lengths]
    d, rows_out = torch.zeros(B, n, dtype=torch.float64), []
    for l in range(2, 12):  # the window starts at row 2 (rows 0, 1 final)
        d = apply(A[l], d, "full") + r[l]
        rows_out.append(d)
    packing = Packing("full", r[0], 3)
    bufs = []
    offsets = [0, 4, 9, 12]
    for q in range(3):
        buf = packing.new()
        packing.put(buf, packing.u_last, U_last[q])
        lo, hi = offsets[q], offsets[q + 1]
        j = 2 if q == 0 else 0  # rank 0's first unconverged row; the others are unconverged from row 0
        pre, post = local_maps(A[lo:hi], r[lo:hi], None, "full", j, r[0])
        packing.put_maps(buf, post, pre)
        bufs.append(buf)
    x_in, new_last = fold(packing, torch.stack(bufs), [0, 1, 2], offsets, 2, decided=False)
    assert x_in[0] is None
    assert torch.allclose(x_in[1], rows_out[1], atol=1e-12)  # rows_out[i]: row 2 + i
    assert torch.allclose(x_in[2], rows_out[8 - 2], atol=1e-12)
    assert torch.allclose(new_last[0], U_last[0] + rows_out[1], atol=1e-12)
    assert torch.allclose(new_last[1], U_last[1] + rows_out[6], atol=1e-12)


@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo group of one process (this one): the setup's encodings and paths without spawning."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def _count_object_gathers(monkeypatch) -> list:
    from deeppcr_fx.runtime.distributed_comm import Comm

    calls, plain = [0], Comm.gather_objects

    def counted(self, obj, what):
        calls[0] += 1
        return plain(self, obj, what)

    monkeypatch.setattr(Comm, "gather_objects", counted)
    return calls


def test_setup_paths_on_one_rank(one_rank_group, monkeypatch):
    """The fast setup (one tensor all-gather, the state spec and x0 encoded inline) and its fallbacks:
    a state of more components than the fixed layout holds goes through the pickled facts, a state
    wider than the inline slots takes one more all-gather; each gives the sequential answer, and a
    warm start from the solution confirms in one iteration."""
    import deeppcr_fx as deeppcr

    objects = _count_object_gathers(monkeypatch)
    g = torch.Generator().manual_seed(0)
    L = 12

    def check(step, x0, per_step, expected_objects, **options):
        before = objects[0]
        res = deeppcr.solve(step, x0, per_step=per_step, group=one_rank_group, **options)
        z, ref = x0, []
        for l in range(L):
            z = step(z, *(p[l] for p in per_step))
            ref.append(z)
        parts = res.states if isinstance(res.states, tuple) else (res.states,)
        refs = tuple(torch.stack(c) for c in zip(*ref)) if isinstance(x0, tuple) else (torch.stack(ref),)
        assert max(float((a - b).abs().max()) for a, b in zip(parts, refs)) < 1e-10
        assert objects[0] - before == expected_objects
        return res

    W = torch.randn(L, 4, 4, generator=g, dtype=torch.float64) * 0.4
    x0 = torch.randn(3, 4, generator=g, dtype=torch.float64)
    res = check(lambda z, W: torch.tanh(z @ W), x0, (W,), 0)
    warm = deeppcr.solve(lambda z, W: torch.tanh(z @ W), x0, per_step=(W,), group=one_rank_group,
                         initial_guess=res.solution)
    assert warm.stats.warm_start and warm.stats.forward.iterations == 1
    # nine components: more than the fixed layout's MAX_COMPONENTS -> pickled facts
    x9 = tuple(torch.randn(2, 2, generator=g, dtype=torch.float64) for _ in range(9))
    S = torch.rand(L, 2, generator=g, dtype=torch.float64) * 0.5
    check(lambda z, s: tuple(torch.tanh(c * s) for c in z), x9, (S,), 1)
    # 2 x 300 elements: wider than the inline slots -> one more tensor all-gather, no pickling
    xw = torch.randn(2, 300, generator=g, dtype=torch.float64)
    D = torch.rand(L, 300, generator=g, dtype=torch.float64) * 0.5
    check(lambda z, d: torch.tanh(z * d), xw, (D,), 0, jacobian="diag")
