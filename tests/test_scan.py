"""PCR against the sequential affine recurrence, for every Jacobian structure."""
import pytest
import torch

from deeppcr_fx.runtime.scan import affine_scan, rounds

MODES = ["full", "diag", "identity", "zero"]


def _coeffs(mode, L, B, n, g):
    if mode == "full":
        return torch.randn(L, B, n, n, generator=g, dtype=torch.float64) / n ** 0.5
    if mode == "diag":
        return torch.randn(L, B, n, generator=g, dtype=torch.float64)
    return None


def _apply(A, mode, v, transpose=False):
    if mode == "full":
        return (A.transpose(-1, -2) if transpose else A) @ v.unsqueeze(-1)
    if mode == "diag":
        return A * v
    return v if mode == "identity" else torch.zeros_like(v)


def _sequential(A, r, mode):
    out, d = [], torch.zeros_like(r[0])
    for l in range(r.shape[0]):
        a = _apply(A[l], mode, d) if A is not None else _apply(None, mode, d)
        d = (a.squeeze(-1) if mode == "full" else a) + r[l]
        out.append(d)
    return torch.stack(out)


def _sequential_adjoint(A, r, mode):
    L = r.shape[0]
    out = [None] * L
    a = r[L - 1]
    out[L - 1] = a
    for l in range(L - 2, -1, -1):
        t = _apply(A[l + 1], mode, a, transpose=True) if A is not None else _apply(None, mode, a)
        a = (t.squeeze(-1) if mode == "full" else t) + r[l]
        out[l] = a
    return torch.stack(out)


CHUNKS = [0, 3, 7, None]  # plain PCR, work-efficient chunks (L not a multiple too), automatic


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("L", [1, 2, 3, 5, 64, 1000])
def test_scan_matches_sequential(mode, L, chunk):
    g = torch.Generator().manual_seed(L)
    A, r = _coeffs(mode, L, 2, 3, g), torch.randn(L, 2, 3, generator=g, dtype=torch.float64)
    out = affine_scan(A, r, mode, chunk=chunk)
    torch.testing.assert_close(out, _sequential(A, r, mode), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("L", [1, 2, 5, 33, 300])
def test_adjoint_scan_matches_sequential(mode, L, chunk):
    g = torch.Generator().manual_seed(100 + L)
    A, r = _coeffs(mode, L, 2, 3, g), torch.randn(L, 2, 3, generator=g, dtype=torch.float64)
    expected = _sequential_adjoint(A, r, mode)
    out = affine_scan(A, r, mode, transpose=True, chunk=chunk)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk", [0, 5])
def test_unused_row0_coefficients_never_reach_the_result(chunk):
    g = torch.Generator().manual_seed(7)
    A, r = _coeffs("full", 23, 1, 2, g), torch.randn(23, 1, 2, generator=g, dtype=torch.float64)
    expected = affine_scan(A, r, "full", chunk=chunk)
    A[0] = float("inf")
    torch.testing.assert_close(affine_scan(A, r, "full", chunk=chunk)[1:], expected[1:])


@pytest.mark.parametrize("chunk", [0, 3])
def test_scan_does_not_modify_inputs(chunk):
    g = torch.Generator().manual_seed(0)
    A, r = _coeffs("full", 9, 1, 2, g), torch.randn(9, 1, 2, generator=g, dtype=torch.float64)
    A0, r0 = A.clone(), r.clone()
    affine_scan(A, r, "full", chunk=chunk)
    affine_scan(A, r, "full", transpose=True, chunk=chunk)
    assert torch.equal(A, A0) and torch.equal(r, r0)


@pytest.mark.parametrize("L,expected", [(1, 0), (2, 1), (3, 2), (4, 2), (5, 3), (1000, 10), (1024, 10), (1025, 11)])
def test_rounds_is_ceil_log2(L, expected):
    assert rounds(L) == expected
