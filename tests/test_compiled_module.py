"""The compiled module as its owners see it: the wrapped model's attributes, and no stale outputs."""
import torch
import torch.nn as nn

import deeppcr_fx as deeppcr


class _Configured(nn.Module):
    """A model with a ``config`` (as a diffusers UNet or a transformer has), a property and a method."""

    def __init__(self, depth=10, width=4):
        super().__init__()
        self.config = {"depth": depth, "width": width}
        self.layers = nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(width, width), nn.Tanh())])

    @property
    def dtype(self):
        return self.layers[0].weight.dtype

    def describe(self):
        return f"{self.config['depth']} layers"

    def forward(self, x):
        return self.layers(x)


def test_attributes_fall_through_to_the_model():
    model = _Configured()
    compiled = deeppcr.compile(model, policy="always")
    assert compiled.config is model.config and compiled.dtype == torch.float32
    assert compiled.describe() == "10 layers"
    assert isinstance(compiled.deeppcr_config, deeppcr.Config) and compiled.deeppcr_config.policy == "always"
    assert compiled.layers is model.layers  # submodules stay the model's own
    x = torch.randn(2, 4)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    try:
        compiled.no_such_attribute
    except AttributeError as exc:
        assert "no_such_attribute" in str(exc)
    else:
        raise AssertionError("a missing attribute must raise AttributeError")


def test_inputs_refilled_in_place_after_example_inputs_get_fresh_outputs():
    """The recording front end runs the model once while it specialises: that output belongs to that
    moment's input values, never to a later call (even with the same tensor objects)."""
    torch.manual_seed(0)
    model = _Configured()
    x = torch.randn(2, 4)
    compiled = deeppcr.compile(model, policy="always", front_end="record", example_inputs=(x,))
    with torch.no_grad():
        x.mul_(3.0)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)


def test_recording_first_call_returns_this_calls_output():
    torch.manual_seed(0)
    model = _Configured()
    compiled = deeppcr.compile(model, policy="always", front_end="record")
    for scale in (1.0, 2.0):
        x = scale * torch.randn(2, 4)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)


class _Structured(nn.Module):
    """Returns a pytree: a dict holding a tensor, a constant and a (tensor, None) pair."""

    def __init__(self, depth=10, width=4):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return {"out": x, "n": 3, "pair": (2 * x, None)}


def test_recorded_models_may_return_pytrees():
    torch.manual_seed(0)
    model = _Structured()
    compiled = deeppcr.compile(model, policy="always", front_end="record")
    for _ in range(2):  # the recording call, then the rewritten graph
        x = torch.randn(2, 4)
        got, want = compiled(x), model(x)
        assert set(got) == {"out", "n", "pair"} and got["n"] == 3 and got["pair"][1] is None
        torch.testing.assert_close(got["out"], want["out"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["pair"][0], want["pair"][0], rtol=1e-5, atol=1e-6)
    assert compiled.report.front_end == "record" and compiled.report.rewritten
