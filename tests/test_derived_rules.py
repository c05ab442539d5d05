"""Rules the compiler's cost model reads from the runtime instead of mirroring them: one test each that
fails if the two sides drift apart.

- the scan's chunk size K and when it chunks (``runtime/scan.py`` -> ``passes/cost_model.py``);
- when Jacobians come from a replicated batch (``runtime/jacobians.replicates`` -> ``step_profile``);
- how a state splits into B samples of n elements (``runtime/state.sample_layout`` -> ``step_profile``).
"""
import dataclasses

import pytest
import sympy
import torch

import deeppcr_fx as deeppcr
from compile_zoo import ZOO
from deeppcr_fx.passes import cost_model as cm
from deeppcr_fx.passes.step_profile import ChainShape
from deeppcr_fx.runtime.pcr_solve import PCRSolve
from deeppcr_fx.runtime.scan import default_chunk
from deeppcr_fx.runtime.state import StateSpec

BASE = ChainShape(length=1, batch=1, width=4, ops=2, module_calls=1, flops=36.0, per_step_tensors=2,
                  grad_tensors=2, residual=False, mode="full", iteration_cap=64, itemsize=4, device_type="cpu",
                  backward=True)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_cost_model_chunks_the_scan_as_the_runtime_does(device):
    K = sympy.lambdify(cm.SYMBOLS["L"], cm.chunk_expression())
    for length in range(1, 5000):
        runtime = default_chunk(length, torch.device(device))
        chunked = cm.chunked_scan(dataclasses.replace(BASE, length=length, device_type=device))
        assert chunked == (runtime > 0), length
        if chunked:
            assert int(K(length)) == runtime, length


def _shapes_and_runs(monkeypatch, builder, **options):
    """The cost model's ChainShapes for ``builder``'s model, and the runtime's stats of the same chains."""
    shapes = []
    real = cm.chunked_scan  # every prediction asks it, with the whole ChainShape
    monkeypatch.setattr(cm, "chunked_scan", lambda shape: shapes.append(shape) or real(shape))
    torch.manual_seed(0)
    model, inputs, _ = builder()
    compiled = deeppcr.compile(model, policy="always", jacobian="full", **options)
    compiled(*inputs)
    solvers = [m for m in compiled.graph_module.modules() if isinstance(m, PCRSolve)]
    return shapes, [s.last_stats for s in solvers]


CASES = {
    "replicated": (ZOO["mlp"], {}),  # B = 3, n = 8: 24 samples
    "one sample": (ZOO["mlp"], {"batch": False}),  # no batch dimension to replicate
    "too many samples": (lambda: ZOO["mlp"](w=48), {}),  # B = 3, n = 48: 144 > REPLICATE_MAX_SAMPLES
    "input with the batch dimension": (ZOO["conditioning"], {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_profile_predicts_the_replicated_jacobians_the_runtime_uses(monkeypatch, case):
    builder, options = CASES[case]
    shapes, stats = _shapes_and_runs(monkeypatch, builder, **options)
    assert len(shapes) == len(stats) == 1
    assert shapes[0].replicated == (stats[0].autodiff == "replicated"), case
    assert (shapes[0].batch, shapes[0].width) == (stats[0].batch_size, stats[0].width)


@pytest.mark.parametrize("batch", [None, True, False])
@pytest.mark.parametrize("shape", [(5,), (3, 4), (2, 3, 4)])
def test_profile_splits_the_state_as_the_solver_does(monkeypatch, batch, shape):
    class Chain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scales = torch.nn.ParameterList(torch.nn.Parameter(torch.rand(shape[-1])) for _ in range(8))

        def forward(self, x):
            for s in self.scales:
                x = torch.tanh(x * s)
            return x

    x = torch.randn(*shape, dtype=torch.float64)
    shapes, stats = _shapes_and_runs(monkeypatch, lambda: (Chain().double(), (x,), None), batch=batch)
    spec = StateSpec.of(x, batch)
    assert (shapes[0].batch, shapes[0].width) == (spec.batch_size, spec.width) == (stats[0].batch_size,
                                                                                    stats[0].width)
