"""Module hooks: they fire with the eager model's values, and the chains they sit in stay sequential.

Before, a forward hook registered on a layer inside a chain after compiling never fired, and a full
backward hook registered before compiling never fired either: the solver never calls the modules.
"""
import torch
import torch.nn as nn

import deeppcr_fx as deeppcr
from deeppcr_fx import Reason


def _mlp(depth=12, width=4):
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(width, width), nn.Tanh())])


def _capture(store):
    def hook(module, inputs, output):
        store.append(output.detach().clone())
    return hook


def test_forward_hook_registered_after_compiling_fires():
    model = _mlp()
    compiled = deeppcr.compile(model, policy="always")
    x = torch.randn(2, 4)
    compiled(x)
    assert compiled.report.rewritten
    seen, expected = [], []
    handle = model[6].register_forward_hook(_capture(seen))
    y = compiled(x)
    handle.remove()
    model[6].register_forward_hook(_capture(expected))
    torch.testing.assert_close(y, model(x), rtol=1e-5, atol=1e-6)
    assert len(seen) == 1 and len(expected) == 1
    torch.testing.assert_close(seen[0], expected[0])


def test_full_backward_hook_registered_before_compiling_fires():
    model = _mlp()
    grads = []
    model[4].register_full_backward_hook(lambda m, gin, gout: grads.append(gout[0].detach().clone()))
    compiled = deeppcr.compile(model, policy="always")
    x = torch.randn(2, 4, requires_grad=True)
    compiled(x).sum().backward()
    assert len(grads) == 1
    # the hooked layer is called as a module (it splits the stack); no rewritten chain covers it
    assert "4" in compiled.report.opaque_modules and "backward" in compiled.report.opaque_modules["4"]
    assert compiled.report.rewritten and all("4" not in c.covers for c in compiled.report.rewritten)
    model_grads = []
    model[4]._backward_hooks.clear()
    model[4].register_full_backward_hook(lambda m, gin, gout: model_grads.append(gout[0].detach().clone()))
    model(x).sum().backward()
    torch.testing.assert_close(grads[0], model_grads[0], rtol=1e-5, atol=1e-6)


def test_hooked_chain_is_refused_with_a_reason():
    """The recording front end inlines every module: a chain through a hooked one is refused, and the
    model runs as written so the hook fires."""
    model = _mlp()
    calls = []
    model[2].register_forward_pre_hook(lambda m, a: calls.append(1))
    report = deeppcr.explain(model, (torch.randn(2, 4),), policy="always", front_end="record")
    assert Reason.HOOKED_MODULE in report.reasons()
    assert "hooked_module" in str(report) and Reason.HOOKED_MODULE.remedy in str(report)
    compiled = deeppcr.compile(model, policy="always", front_end="record")
    calls.clear()
    x = torch.randn(2, 4)
    for _ in range(2):
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    assert len(calls) == 4


def test_symbolic_tracing_keeps_hooked_modules_as_calls():
    model = _mlp()
    model[2].register_forward_pre_hook(lambda m, a: None)
    report = deeppcr.explain(model, (torch.randn(2, 4),), policy="always")
    assert "has hooks" in report.opaque_modules["2"]
    assert all("2" not in c.covers for c in report.rewritten)


def test_hooks_on_the_model_itself_run_the_model_as_written():
    model = _mlp()
    calls = []
    model.register_forward_hook(lambda m, a, o: calls.append(1))
    compiled = deeppcr.compile(model, policy="always")
    x = torch.randn(2, 4)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    assert len(calls) == 2 and any("hooks" in n for n in compiled.report.notes)
