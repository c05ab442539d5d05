"""Chains the compiler must leave sequential, each with its typed reason and a remedy."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import deeppcr_fx as deeppcr
from deeppcr_fx import Reason
from compile_zoo import Residual, Stack


def _compile(model, *inputs, **options):
    options.setdefault("policy", "always")
    compiled = deeppcr.compile(model, **options)
    out = compiled(*inputs)
    torch.testing.assert_close(out, model(*inputs), rtol=1e-9, atol=1e-9)  # still the original numbers
    return compiled.report


def _only_refusal(report, reason):
    assert [c.reason for c in report.chains] == [reason], str(report)
    rec = report.refused[0]
    assert rec.remedy and rec.remedy == reason.remedy
    assert reason.value in str(report)
    return rec


class NormAct(nn.Module):
    def __init__(self, w, norm, p=0.0):
        super().__init__()
        self.lin, self.norm, self.drop = nn.Linear(w, w), norm, nn.Dropout(p)

    def forward(self, x):
        return x + self.drop(torch.tanh(self.norm(self.lin(x))))


def test_shapes_differ():
    torch.manual_seed(0)
    widths = [64, 48, 32, 24, 16, 12, 8, 6, 4, 3]
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    model = nn.Sequential(*layers).double()
    rec = _only_refusal(_compile(model, torch.randn(2, 64, dtype=torch.float64)), Reason.SHAPES_DIFFER)
    assert rec.length == len(widths) - 1


def test_batchnorm_train_mutates_buffers():
    torch.manual_seed(0)
    model = Stack([NormAct(8, nn.BatchNorm1d(8)) for _ in range(8)]).double().train()
    x = torch.randn(5, 8, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compiled = deeppcr.compile(model, policy="always")
    compiled(x)
    model.load_state_dict(before)
    report = compiled.report
    _only_refusal(report, Reason.BUFFER_MUTATION)
    # eval mode: no mutation, the same model is a chain (re-specialised on the mode change)
    compiled.eval()
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-9, atol=1e-9)
    assert [c.length for c in compiled.report.rewritten] == [8]


def test_dropout_train_is_randomness():
    torch.manual_seed(0)
    model = Stack([NormAct(8, nn.LayerNorm(8), p=0.2) for _ in range(8)]).double().train()
    compiled = deeppcr.compile(model, policy="always")
    x = torch.randn(3, 8, dtype=torch.float64)
    torch.manual_seed(3)
    out = compiled(x)
    torch.manual_seed(3)
    torch.testing.assert_close(out, model(x))
    _only_refusal(compiled.report, Reason.RANDOMNESS)
    compiled.eval()
    compiled(x)
    assert [c.length for c in compiled.report.rewritten] == [8]


class Branchy(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.lin = nn.Linear(w, w)

    def forward(self, x):
        if x.sum() > 0:
            return torch.tanh(self.lin(x))
        return torch.sigmoid(self.lin(x))


def test_data_dependent_control_flow_in_blocks():
    torch.manual_seed(0)
    model = Stack([Branchy(8) for _ in range(8)]).double()
    report = _compile(model, torch.randn(3, 8, dtype=torch.float64))
    rec = _only_refusal(report, Reason.DATA_DEPENDENT_CONTROL_FLOW)
    assert rec.length == 8
    assert set(report.opaque_modules) == {f"blocks.{i}" for i in range(8)}


def test_too_short_with_default_min_length():
    torch.manual_seed(0)
    model = Stack([Residual(8) for _ in range(4)]).double()
    rec = _only_refusal(_compile(model, torch.randn(3, 8, dtype=torch.float64), policy="always"), Reason.TOO_SHORT)
    assert rec.length == 4
    compiled = deeppcr.compile(model, policy="always", min_length=2)
    compiled(torch.randn(3, 8, dtype=torch.float64))
    assert [c.length for c in compiled.report.rewritten] == [4]


def test_policy_never_reports_only():
    torch.manual_seed(0)
    model = Stack([Residual(8) for _ in range(8)]).double()
    report = _compile(model, torch.randn(3, 8, dtype=torch.float64), policy="never")
    _only_refusal(report, Reason.POLICY_NEVER)


def test_policy_auto_on_cpu_is_not_profitable():
    torch.manual_seed(0)
    model = Stack([Residual(8) for _ in range(8)]).double()
    report = _compile(model, torch.randn(3, 8, dtype=torch.float64), policy="auto")
    _only_refusal(report, Reason.NOT_PROFITABLE)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Residual(8) for _ in range(8))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
            if x.norm() > 1e6:  # data-dependent control flow in the model's own forward
                break
        return x


def test_untraceable_model_runs_original():
    torch.manual_seed(0)
    model = Untraceable().double()
    x = torch.randn(3, 8, dtype=torch.float64)
    compiled = deeppcr.compile(model, policy="auto")
    torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
    report = compiled.report
    assert report.failure == Reason.TRACE_FAILED and compiled.graph_module is None
    assert "symbolic" in report.failure_detail and report.failure.remedy in str(report)


def test_untraceable_model_policy_always_raises():
    torch.manual_seed(0)
    compiled = deeppcr.compile(Untraceable().double(), policy="always")
    with pytest.raises(deeppcr.CompileError, match="cannot be compiled"):
        compiled(torch.randn(3, 8, dtype=torch.float64))


def test_in_place_op_in_block():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            h = self.lin(x)
            h.mul_(0.5)
            return x + torch.tanh(h)

    torch.manual_seed(0)
    report = _compile(Stack([InPlace() for _ in range(8)]).double(), torch.randn(3, 8, dtype=torch.float64))
    _only_refusal(report, Reason.BUFFER_MUTATION)


def test_per_step_python_float_the_op_needs_as_float():
    """A constant that differs per step but must stay a Python float (celu's alpha: no tensor form in
    passes/scalar_args.py) is refused, naming the op."""

    class Leaky(nn.Module):
        def __init__(self, slope):
            super().__init__()
            self.lin, self.slope = nn.Linear(8, 8), slope

        def forward(self, x):
            return x + F.celu(self.lin(x), 1.0 + self.slope)

    torch.manual_seed(0)
    model = Stack([Leaky(0.01 * (i + 1)) for i in range(8)]).double()
    rec = _only_refusal(_compile(model, torch.randn(3, 8, dtype=torch.float64)), Reason.UNSTACKABLE_INPUT)
    assert "template" in rec.detail and "celu" in rec.detail and "Python number" in rec.detail


def test_per_step_python_float_as_tensor_is_stacked():
    class Scaled(nn.Module):
        def __init__(self, scale):
            super().__init__()
            self.lin, self.scale = nn.Linear(8, 8), scale

        def forward(self, x):
            return x + self.scale * torch.tanh(self.lin(x))

    torch.manual_seed(0)
    model = Stack([Scaled(0.1 * (i + 1)) for i in range(8)]).double()
    compiled = deeppcr.compile(model, policy="always")
    x = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-9, atol=1e-9)
    rec = compiled.report.rewritten[0]
    assert rec.n_per_step == 3  # weight, bias and the scale (a float64 tensor of the 8 Python floats)

