"""The row loop's vectorised float32 exp/tanh/sigmoid (runtime/vecmath.py) against float64 references, and the
blocked row loop (runtime/rowloop.py) against the scalar one it replaces, at lengths that leave a partial block."""
import pytest
import torch

from chains import PROBLEMS
from deeppcr_fx.runtime import rowloop, vecmath
from deeppcr_fx.runtime.cloop import load
from deeppcr_fx.runtime.modes import mode_of
from deeppcr_fx.runtime.state import StateSpec
from test_cloop import gru

FUNCTIONS = {"dp_vexp": torch.exp, "dp_vtanh": torch.tanh, "dp_vsigmoid": torch.sigmoid}
ULPS = {"dp_vexp": 1.5, "dp_vtanh": 2.0, "dp_vsigmoid": 2.5}  # measured 0.95 / 1.20 / 1.97 (vecmath docstring)


@pytest.fixture(scope="module")
def kernels():
    out = {}
    for name in FUNCTIONS:
        params = ["float* p", "int64_t n"]
        source = "\n".join(["#include <cmath>", "#include <cstdint>", vecmath.SOURCE,
                            f'extern "C" void kernel({", ".join(params)}) {{ dp_vapply<{name}>(p, n); }}', ""])
        out[name] = load(params, source)
    return out


def _samples():
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 2 ** 31 - 1, (200_000,), generator=g, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    x = x[torch.isfinite(x)]
    dense = torch.linspace(-100, 100, 40_001)
    small = torch.logspace(-30, 1, 5_000)
    return torch.cat([x, -x, dense, small, -small, torch.zeros(1)])


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_functions_within_two_ulp_of_float64(kernels, name):
    x = _samples()
    y = x.clone()
    kernels[name](y, y.numel())
    ref = FUNCTIONS[name](x.double())
    ref32 = ref.float()
    keep = torch.isfinite(ref32) & (ref32.abs() >= torch.finfo(torch.float32).tiny)  # ulps of normal results
    ulp = (torch.nextafter(ref32.abs(), torch.tensor(float("inf"))) - ref32.abs()).double()
    err = ((y.double() - ref).abs() / ulp)[keep]
    assert err.max() <= ULPS[name], (name, float(err.max()), float(x[keep][err.argmax()]))
    assert torch.equal(torch.isinf(y), torch.isinf(ref32)) and torch.equal(torch.isnan(y), torch.isnan(ref32))


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_special_values_and_partial_vectors(kernels, name):
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), -200.0, 200.0, 0.0, 1e-30, -0.7, 0.3, 5.0, -88.0])
    for n in (1, 3, 8, 11):  # a partial vector is read and written only up to n
        y = torch.cat([x[:n].clone(), torch.full((4,), 7.0)])
        kernels[name](y, n)
        torch.testing.assert_close(y[:n], FUNCTIONS[name](x[:n].double()).float(), rtol=3e-7, atol=0, equal_nan=True)
        assert torch.equal(y[n:], torch.full((4,), 7.0))


@pytest.mark.parametrize("problem,mode", [("tanh", "full"), ("tanh", "diag"), ("gru", "full")])
@pytest.mark.parametrize("L", [1, 8, 21])
def test_blocked_row_loop_matches_the_scalar_loop(problem, mode, L, monkeypatch):
    chain = PROBLEMS["tanh"](L, B=3, dtype=torch.float32) if problem == "tanh" else gru(L, n=3, dtype=torch.float32, B=2)
    spec = StateSpec.of(chain.x0, None)
    x0 = spec.flatten(chain.x0)
    U = torch.randn(L, *x0.shape, generator=torch.Generator().manual_seed(L)) * 2

    def run():
        rows = rowloop.compile_rows(chain.step, spec, mode_of(mode), chain.per_step, chain.shared, x0)
        vals, A = rows.empty(U)
        rows(U, x0, chain.per_step, chain.shared, vals, A)
        return rows.source, vals, A

    source, vals, A = run()
    monkeypatch.setattr(rowloop, "VECTOR_MATH", False)
    scalar_source, want_vals, want_A = run()
    assert "dp_vapply<dp_vtanh>" in source and "dp_vapply" not in scalar_source
    assert "std::tanh" not in source and "std::tanh" in scalar_source
    torch.testing.assert_close(vals, want_vals, rtol=5e-7, atol=1e-7)
    torch.testing.assert_close(A, want_A, rtol=2e-6, atol=2e-7)


def test_float64_and_steps_without_transcendentals_keep_the_scalar_loop():
    chain = PROBLEMS["tanh"](5, dtype=torch.float64)
    spec = StateSpec.of(chain.x0, None)
    rows = rowloop.compile_rows(chain.step, spec, mode_of("full"), chain.per_step, chain.shared,
                                spec.flatten(chain.x0))
    assert "dp_vapply" not in rows.source and "std::tanh" in rows.source
    relu = lambda z, W, b: torch.relu(torch.nn.functional.linear(z, W, b))  # noqa: E731
    chain = PROBLEMS["tanh"](5, dtype=torch.float32)
    spec = StateSpec.of(chain.x0, None)
    rows = rowloop.compile_rows(relu, spec, mode_of("full"), chain.per_step, chain.shared, spec.flatten(chain.x0))
    assert "dp_vapply" not in rows.source and "B_t" not in rows.source
