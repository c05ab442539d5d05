"""The C++ cyclic reduction (runtime/cscan.py) against the sequential recurrence, and its place in the traced
scan: one custom-op node on CPU for the modes with C++ products, the whole-tensor form otherwise."""
import pytest
import torch

from deeppcr_fx.runtime import backend, cscan, fused_scan
from deeppcr_fx.runtime.modes import mode_of


def _system(mode, length, B, n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(length, B, n, n, dtype=torch.float64, generator=g) * 0.6
    A = (A if mode == "full" else A[..., 0]).to(dtype)
    r = torch.randn(length, B, n, dtype=torch.float64, generator=g).to(dtype)
    return A, r


def _sequential(A, r, mode):
    want, z = [], torch.zeros_like(r[0], dtype=torch.float64)
    for l in range(r.shape[0]):  # delta_l = A_l delta_{l-1} + r_l, delta_{-1} = 0
        a = A[l].double()
        z = r[l].double() + ((a @ z.unsqueeze(-1)).squeeze(-1) if mode == "full" else a * z)
        want.append(z)
    return torch.stack(want)


@pytest.mark.parametrize("mode", ["full", "diag"])
@pytest.mark.parametrize("length", [1, 2, 3, 5, 8, 23, 64, 97])
@pytest.mark.parametrize("dtype,B,n", [(torch.float64, 2, 3), (torch.float32, 1, 4), (torch.float64, 3, 1)])
def test_matches_the_sequential_recurrence_and_never_reads_row_0(mode, length, dtype, B, n):
    A, r = _system(mode, length, B, n, dtype, seed=length)
    want = _sequential(A, r, mode)
    A = A.clone()
    A[0] = float("nan")  # row 0's map multiplies the zero vector before the chain: never read
    got = cscan.cyclic_reduction(A, r, mode_of(mode))
    assert got.dtype == dtype and got.shape == r.shape
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), want, **tol)
    assert torch.equal(r, _system(mode, length, B, n, dtype, seed=length)[1])  # inputs untouched


def test_non_contiguous_inputs_are_read_as_their_values():
    A, r = _system("full", 37, 2, 3, torch.float64, seed=1)
    At, rt = A.transpose(0, 1).contiguous().transpose(0, 1), r.transpose(0, 1).contiguous().transpose(0, 1)
    assert not rt.is_contiguous()
    torch.testing.assert_close(cscan.cyclic_reduction(At, rt, mode_of("full")), _sequential(A, r, "full"),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode,expected", [("full", True), ("diag", True), ("identity", False)])
def test_the_traced_scan_is_one_node_on_cpu(mode, expected, monkeypatch):
    A, r = _system("full" if mode != "diag" else "diag", 19, 2, 3, torch.float64, seed=2)
    A = A if mode != "identity" else None

    def targets(fn):
        gm = backend.trace(fn, (A, r) if A is not None else (r,))
        return {str(node.target) for node in gm.graph.nodes if node.op == "call_function"}

    fn = (lambda A, r: fused_scan.scan(A, r, mode)) if A is not None else (lambda r: fused_scan.scan(None, r, mode))
    assert ("deeppcr.cyclic_reduction.default" in targets(fn)) == expected
    monkeypatch.setattr(cscan, "ENABLED", False)
    assert "deeppcr.cyclic_reduction.default" not in targets(fn)


def test_wide_states_keep_the_whole_tensor_form():
    """Above MAX_WIDTH the C++ loops were slower than inductor's (cscan's comment): the traced scan keeps its form."""
    for n, expected in ((cscan.MAX_WIDTH, True), (cscan.MAX_WIDTH + 2, False)):
        A, r = _system("full", 9, 1, n, torch.float32, seed=n)
        assert cscan.supported(A, r, mode_of("full")) == expected
        gm = backend.trace(lambda A, r: fused_scan.scan(A, r, "full"), (A, r))
        found = any(str(node.target) == "deeppcr.cyclic_reduction.default" for node in gm.graph.nodes)
        assert found == expected
