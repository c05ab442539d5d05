"""The compiled module as its owners see it: the wrapped model's attributes, and no stale outputs."""
import pytest
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


class _Keywords(nn.Module):
    """Optional inputs by keyword, a Python option, and a default left out (``mask``)."""

    def __init__(self, depth=10, width=4):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x, cond=None, scale=1.0, mask=None):
        for layer in self.layers:
            x = torch.tanh(layer(x)) * scale
            if cond is not None:
                x = x + cond
        return x if mask is None else x * mask


def test_keyword_inputs_are_traced_and_specialised():
    """Tensors passed by keyword are graph inputs; Python values and defaults left out are constants of the
    specialisation (a placeholder for ``cond=None`` would take the ``cond is not None`` branch)."""
    torch.manual_seed(0)
    model = _Keywords().double()
    compiled = deeppcr.compile(model, policy="always")
    x, c = torch.randn(3, 4, dtype=torch.float64), 0.1 * torch.randn(3, 4, dtype=torch.float64)
    calls = [lambda f: f(x, cond=c), lambda f: f(x, scale=0.5), lambda f: f(mask=c, x=x, cond=c),
             lambda f: f(x, c, 0.9), lambda f: f(x)]
    for n, call in enumerate(calls, 1):
        for _ in range(2):
            torch.testing.assert_close(call(compiled), call(model), rtol=1e-9, atol=1e-12)
        assert compiled.report.front_end == "symbolic" and [c.length for c in compiled.report.rewritten] == [10]
        assert compiled.specialisations == n


class _Cache:
    """An object torch's pytree does not know, holding per-layer tensors (as a transformers DynamicCache)."""

    def __init__(self):
        self.keys, self.device = [], None


class _Caching(nn.Module):
    def __init__(self, depth=10, width=4):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.keys = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        cache = _Cache()
        for layer, key in zip(self.layers, self.keys):
            k = key(x)
            cache.keys.append(torch.cat([torch.tensor([], dtype=x.dtype), k], dim=-1))
            x = torch.tanh(layer(x) + 0.1 * k)
        cache.device = x.device
        return x, cache


def test_values_handed_to_the_caller_are_recomputed_after_the_chain():
    """Each step puts a value into an object the model returns: the chain is still rewritten (the values are
    recomputed from the solved states after it), and the object is rebuilt on every call."""
    torch.manual_seed(0)
    model = _Caching().double()
    compiled = deeppcr.compile(model, policy="always", front_end="record")
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    compiled(x)
    report = compiled.report
    assert [c.length for c in report.rewritten] == [10], str(report)
    assert any("recomputed from the solved states" in n for n in report.notes)
    (out, cache), (ref, ref_cache) = compiled(x), model(x)
    assert type(cache) is _Cache and cache is not compiled(x)[1] and cache.device == x.device
    for a, b in zip([out] + cache.keys, [ref] + ref_cache.keys):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    loss = lambda o, c: (o.sum() + sum((k * k).sum() for k in c.keys))  # noqa: E731
    got = torch.autograd.grad(loss(out, cache), [x, *model.parameters()])
    want = torch.autograd.grad(loss(ref, ref_cache), [x, *model.parameters()])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_report_set_when_nothing_captures_the_model():
    class Branchy(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    compiled = deeppcr.compile(Branchy(), policy="always", front_end="record")
    try:
        compiled(torch.ones(2, 2))
    except deeppcr.CompileError:
        pass
    assert compiled.report is not None and compiled.report.failure is not None


class _Keyed(nn.Module):
    """Returns every layer's key besides the last state: values leaving the steps for the caller."""

    def __init__(self, depth=10, width=4):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.keys = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        keys = []
        for layer, key in zip(self.layers, self.keys):
            keys.append(key(x))
            x = torch.tanh(layer(x) + 0.1 * keys[-1])
        return x, keys


@pytest.mark.parametrize("front_end", ["symbolic", "dynamo"])
def test_values_for_the_caller_in_traced_graphs(front_end):
    torch.manual_seed(0)
    model = _Keyed().double()
    compiled = deeppcr.compile(model, policy="always", front_end=front_end)
    x = torch.randn(2, 4, dtype=torch.float64)
    compiled(x)
    assert [c.length for c in compiled.report.rewritten] == [10], str(compiled.report)
    (out, keys), (ref, ref_keys) = compiled(x), model(x)
    for a, b in zip([out] + keys, [ref] + ref_keys):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_a_tensor_made_in_forward_and_written_is_new_on_every_call():
    """``buf = torch.zeros(...)`` in forward is a trace-time constant; written into and returned, it must
    still be a new tensor per call (as eager makes it), not one tensor every call overwrites."""

    class Collect(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(10))

        def forward(self, x):
            for layer in self.layers:
                x = torch.tanh(layer(x))
            buf = torch.zeros(2, 3, 4, dtype=x.dtype)
            buf[0] = x
            buf[1].add_(x * 2)
            return buf

    torch.manual_seed(0)
    model = Collect().double()
    compiled = deeppcr.compile(model, policy="always")
    x1, x2 = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    a = compiled(x1)
    b = compiled(x2)
    assert compiled.report.front_end == "symbolic" and compiled.report.rewritten
    assert a is not b
    torch.testing.assert_close(a, model(x1), rtol=1e-9, atol=1e-11)  # not overwritten by the second call
    torch.testing.assert_close(b, model(x2), rtol=1e-9, atol=1e-11)
