"""The same pass as a TorchDynamo backend: torch.compile(model, backend="deeppcr")."""
import types

import pytest
import torch

import deeppcr_fx as deeppcr
from deeppcr_fx.api import make_backend
from compile_helpers import check_numerics, check_structure
from compile_zoo import ZOO
from diffusion_zoo import sampler


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_through_dynamo(name):
    torch.manual_seed(0)
    model, inputs, expected = ZOO[name]()
    backend = make_backend(policy="always")
    opt = torch.compile(model, backend=backend)
    check_numerics(model, opt, inputs, torch.float64)
    assert len(backend.reports) == 1
    for report, gm in zip(backend.reports, backend.graph_modules):
        assert report.front_end == "dynamo"
        check_structure(types.SimpleNamespace(report=report, graph_module=gm), expected)


def test_registered_backend_name_and_options():
    torch.manual_seed(0)
    model, inputs, expected = ZOO["residual"]()
    opt = torch.compile(model, backend="deeppcr", options={"policy": "always", "jacobian": "diag"})
    torch.testing.assert_close(opt(*inputs), model(*inputs), rtol=1e-9, atol=1e-9)


def test_backend_default_policy_auto_keeps_cpu_chains_sequential():
    torch.manual_seed(0)
    model, inputs, _ = ZOO["residual"]()
    backend = make_backend()
    opt = torch.compile(model, backend=backend)
    torch.testing.assert_close(opt(*inputs), model(*inputs), rtol=0, atol=0)
    assert backend.reports[0].reasons() == [deeppcr.Reason.NOT_PROFITABLE]


def test_compile_with_dynamo_front_end():
    torch.manual_seed(0)
    model, inputs, expected = ZOO["transformer"]()
    compiled = deeppcr.compile(model, policy="always", front_end="dynamo")
    check_numerics(model, compiled, inputs, torch.float64)
    assert compiled.report.front_end == "dynamo"
    check_structure(compiled, expected)


def test_diffusers_scheduler_breaks_the_dynamo_graph():
    """DDIM indexes alphas_cumprod with a tensor timestep: TorchDynamo breaks the graph at every step,
    so its graphs hold no chain; the report says so. compile()'s symbolic front end finds the loop."""
    model, (x,) = sampler("ddim", steps=4)
    model.requires_grad_(False)  # (TorchDynamo warns about .grad of non-leaf tensors at these breaks)
    backend = make_backend(policy="always", min_length=2)
    opt = torch.compile(model, backend=backend)
    torch.testing.assert_close(opt(x), model(x), rtol=0, atol=0)
    assert len(backend.reports) > 1
    assert not any(r.rewritten for r in backend.reports)
    assert any("graph break" in n for n in backend.reports[-1].notes)
    torch._dynamo.reset()
    with pytest.raises(deeppcr.CompileError, match="TorchDynamo"):
        deeppcr.compile(model, policy="always", front_end="dynamo", min_length=2)(x)
    torch._dynamo.reset()
    compiled = deeppcr.compile(model, policy="never", front_end="dynamo", min_length=2)
    torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
    assert compiled.report.failure == deeppcr.Reason.TRACE_FAILED
    assert "TorchDynamo" in compiled.report.failure_detail


def test_fast_path_without_derivative_is_refused():
    """Under no_grad, TorchDynamo captures nn.TransformerEncoderLayer's fused fast path, which has no
    derivative: Newton cannot linearise it, so the chain stays sequential, with its reason."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, num_layers=8, enable_nested_tensor=False).double().eval()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    backend = make_backend(policy="always")
    opt = torch.compile(model, backend=backend)
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), rtol=0, atol=0)
    assert backend.reports[-1].reasons() == [deeppcr.Reason.NOT_DIFFERENTIABLE]
