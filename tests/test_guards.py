"""Guards: what a trace read is an assumption. Each test changes one thing after compiling (or reads
something the trace would otherwise freeze) and checks the compiled model still gives the eager answer.
"""
import pytest
import torch
import torch.nn as nn

import deeppcr_fx as deeppcr


def _mlp(depth=12, width=4):
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(width, width), nn.Tanh())])


class _Noisy(nn.Module):
    """Noise drawn from concrete shapes (``torch.randn(h.shape)``) inside the steps and after the chain."""

    def __init__(self, depth=12, width=4):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        h = x
        for layer in self.layers:
            h = torch.tanh(layer(h)) + 0.1 * torch.randn(h.shape)
        return h + torch.randn(h.shape)


def test_noise_is_drawn_on_every_call_as_eager_draws_it():
    torch.manual_seed(0)
    model = _Noisy()
    compiled = deeppcr.compile(model, policy="always")
    x = torch.randn(2, 4)
    outs = []
    for seed in (5, 6):
        torch.manual_seed(seed)
        y = compiled(x)
        after_compiled = torch.rand(3)
        torch.manual_seed(seed)
        ref = model(x)
        after_eager = torch.rand(3)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
        assert torch.equal(after_compiled, after_eager)  # the RNG advanced exactly as eager's
        outs.append(y)
    assert not torch.allclose(outs[0], outs[1])
    assert compiled.report.rewritten and any(i.hoisted for i in compiled.report.rewritten[0].inputs)


def test_parameters_assigned_by_load_state_dict_are_used_and_trained():
    model = _mlp()
    compiled = deeppcr.compile(model, policy="always")
    x = torch.randn(2, 4)
    compiled(x)
    torch.manual_seed(1)
    model.load_state_dict({k: 0.5 * torch.randn_like(v) for k, v in model.state_dict().items()}, assign=True)
    y = compiled(x)
    torch.testing.assert_close(y, model(x), rtol=1e-5, atol=1e-6)
    y.sum().backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)


def test_parameters_that_view_a_users_tensor_stay_views():
    """``Parameter(flat[l])`` shares ``flat``'s storage: flattening would cut it loose (in the original model
    too), so such chains stack per call and the user's tensor keeps driving both models."""
    model = _mlp()
    flat = torch.randn(12, 4, 4) * 0.5
    for l in range(12):
        model[2 * l].weight = nn.Parameter(flat[l])
    compiled = deeppcr.compile(model, policy="always")
    x = torch.randn(2, 4)
    compiled(x)
    with torch.no_grad():
        flat.mul_(0.5)
    assert torch.equal(model[0].weight, flat[0])
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)


def test_functional_call_uses_the_given_tensors_and_differentiates_them():
    from torch.func import functional_call

    model = _mlp()
    compiled = deeppcr.compile(model, policy="always")
    x = torch.randn(2, 4)
    compiled(x)
    originals = {k: v.detach().clone() for k, v in model.named_parameters()}
    for _ in range(2):
        params = {k: (0.5 * torch.randn_like(v)).requires_grad_() for k, v in model.named_parameters()}
        with torch.no_grad():
            torch.testing.assert_close(functional_call(compiled, params, (x,)), functional_call(model, params, (x,)),
                                       rtol=1e-5, atol=1e-6)
        functional_call(compiled, params, (x,)).sum().backward()
        refs = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
        functional_call(model, refs, (x,)).sum().backward()
        for k in params:
            torch.testing.assert_close(params[k].grad, refs[k].grad, rtol=1e-5, atol=1e-6)
    for k, v in model.named_parameters():  # the model's own Parameters are untouched
        assert torch.equal(v, originals[k])
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)


def test_specialisations_are_bounded():
    """Past Config.cache_limit, new input signatures run the original model: exact, one warning, a note."""
    model = _mlp()
    compiled = deeppcr.compile(model, policy="always", cache_limit=2)
    for batch in (1, 2):
        x = torch.randn(batch, 4)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    with pytest.warns(RuntimeWarning, match="cache_limit=2"):
        x = torch.randn(3, 4)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    assert "cache_limit=2" in compiled.report.notes[0] and compiled.specialisations == 2
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only the first call past the limit warns
        for batch in (4, 5):
            x = torch.randn(batch, 4)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    assert compiled.specialisations == 2


class _Tempered(nn.Module):
    """Reads Python attributes in forward: a temperature and a loop length."""

    def __init__(self, depth=12, width=4):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.temperature = 2.0
        self.steps = depth

    def forward(self, x):
        for layer in self.layers[:self.steps]:
            x = torch.tanh(layer(x) / self.temperature)
        return x


def test_python_attributes_read_by_forward_are_guarded():
    torch.manual_seed(0)
    model = _Tempered()
    compiled = deeppcr.compile(model, policy="always")
    x = torch.randn(2, 4)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    assert compiled.report.rewritten
    model.temperature = 0.5
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    model.steps = 10  # the loop's length
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    assert compiled.report.rewritten[0].length == 10
    compiled(x)
    assert compiled.specialisations == 1  # re-specialised in place, not piled up


class _Counting(nn.Module):
    def __init__(self, depth=12, width=4):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def test_python_side_effects_keep_running():
    torch.manual_seed(0)
    model = _Counting()
    compiled = deeppcr.compile(model, policy="always")
    x = torch.randn(2, 4)
    for _ in range(3):
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    assert model.calls == 6  # the compiled module's calls counted, as eager's do
    assert any("_Counting.calls" in n and "side effects" in n for n in compiled.report.notes)


# --- Python values read through plain objects and module globals ---------------------------------------
SCALE = 2.0  # a module-level global read by forward (test_module_globals_read_by_forward_are_guarded)
CALLS = 0


def _squash(h):
    return torch.tanh(h / SCALE)  # a global read by a helper the forward calls


class _Settings:
    def __init__(self):
        self._scale = 1.5
        self.depth = 12

    @property
    def scale(self):  # a property: its value lives in a private attribute
        return self._scale

    @scale.setter
    def scale(self, value):
        self._scale = value


class _Configured(nn.Module):
    """Reads its settings through a plain object: ``self.settings.scale``, ``self.settings.depth``."""

    def __init__(self, depth=12, width=4):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.settings = _Settings()

    def forward(self, x):
        for layer in self.layers[:self.settings.depth]:
            x = torch.tanh(layer(x) / self.settings.scale)
        return x


def _assert_matches(compiled, model, x):
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)


def test_attributes_of_plain_objects_held_by_a_module_are_guarded():
    torch.manual_seed(0)
    model = _Configured()
    compiled = deeppcr.compile(model, policy="always")
    x = torch.randn(2, 4)
    _assert_matches(compiled, model, x)
    report = compiled.report
    for _ in range(2):  # nothing changed: no new specialisation
        _assert_matches(compiled, model, x)
    assert compiled.report is report and report.rewritten
    model.settings.scale = 0.25
    _assert_matches(compiled, model, x)
    model.settings.depth = 9
    _assert_matches(compiled, model, x)
    assert compiled.report.rewritten[0].length == 9
    fresh = _Settings()
    fresh.scale = 3.0
    model.settings = fresh  # the object itself replaced
    _assert_matches(compiled, model, x)
    assert compiled.specialisations == 1


class _GlobalScaled(nn.Module):
    def __init__(self, depth=12, width=4):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = _squash(layer(x)) * SCALE
        return x


def test_module_globals_read_by_forward_are_guarded():
    global SCALE
    torch.manual_seed(0)
    model = _GlobalScaled()
    compiled = deeppcr.compile(model, policy="always")
    x = torch.randn(2, 4)
    try:
        _assert_matches(compiled, model, x)
        report = compiled.report
        _assert_matches(compiled, model, x)
        assert compiled.report is report and report.rewritten
        SCALE = 1.25  # read by forward and by the helper it calls
        _assert_matches(compiled, model, x)
        assert compiled.report is not report and compiled.report.rewritten
    finally:
        SCALE = 2.0


class _CountsGlobally(nn.Module):
    def __init__(self, depth=12, width=4):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        global CALLS
        CALLS += 1
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


@pytest.mark.parametrize("front_end", ["symbolic", "record"])
def test_a_global_set_by_forward_keeps_running(front_end):
    global CALLS
    torch.manual_seed(0)
    model = _CountsGlobally()
    compiled = deeppcr.compile(model, policy="always", front_end=front_end)
    x = torch.randn(2, 4)
    CALLS = 0
    for _ in range(3):
        _assert_matches(compiled, model, x)
    assert CALLS == 6  # the compiled module's calls counted, as eager's do
    assert any("CALLS" in n and "side effects" in n for n in compiled.report.notes)


def test_diffusers_scheduler_settings_are_guarded():
    """A sampling loop over ``scheduler.timesteps``: ``set_timesteps`` after compiling changes the loop's
    length and the step's coefficients (``num_inference_steps``); the compiled sampler follows."""
    pytest.importorskip("diffusers")
    import diffusion_zoo

    model, (x,) = diffusion_zoo.sampler("ddim", steps=10)
    compiled = deeppcr.compile(model, policy="always")
    _assert_matches(compiled, model, x)
    report = compiled.report
    _assert_matches(compiled, model, x)
    assert compiled.report is report and report.rewritten  # the scheduler's own counters do not re-specialise
    model.scheduler.set_timesteps(16)
    _assert_matches(compiled, model, x)
    assert compiled.report.rewritten[0].length == 16
    model.scheduler.config  # noqa: B018 (a read outside a trace records nothing)
    _assert_matches(compiled, model, x)
    assert compiled.specialisations == 1


@pytest.mark.parametrize("kind", ["dpm_multistep", "euler"])
def test_state_the_forward_sets_before_reading_is_not_guarded(kind):
    """A loop that calls ``set_timesteps`` in forward computes its schedule tensors itself: an eager call in
    between (which replaces them) does not make the compiled loop specialise again; a changed step count does."""
    pytest.importorskip("diffusers")
    import diffusion_zoo

    model = diffusion_zoo.zoo_loop(kind, steps=10)
    compiled = deeppcr.compile(model, policy="always", min_length=4)
    x = torch.randn(2, 8, dtype=torch.float64)
    first = compiled(x)
    report = compiled.report
    torch.testing.assert_close(model(x), first, rtol=1e-9, atol=1e-9)  # eager: set_timesteps makes new tensors
    torch.testing.assert_close(compiled(x), first, rtol=1e-9, atol=1e-9)
    assert compiled.report is report  # not specialised again
    model.steps = 12
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-9, atol=1e-9)
    assert compiled.report is not report
