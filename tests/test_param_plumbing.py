"""A compiled chain's per-step Parameters: flat storage, direct gradients, and their fallbacks.

Every check compares against the original model run by plain autograd (float64)."""
import pytest
import torch
import torch.nn as nn

import deeppcr_fx as deeppcr
from deeppcr_fx.runtime.stacked import StackedAttributes


class MLP(nn.Module):
    def __init__(self, L=12, w=3):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(w, w) for _ in range(L))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def _setup(**options):
    torch.manual_seed(0)
    model = MLP().double()
    compiled = deeppcr.compile(model, policy="always", **options)
    return model, compiled, torch.randn(2, 3, dtype=torch.float64)


def _grads(model, fn, x, weight=None):
    model.zero_grad(set_to_none=True)
    out = fn(x)
    (out * (weight if weight is not None else 1)).sum().backward()
    return [p.grad.clone() for p in model.parameters()]


def _stacks(compiled):
    return [m for m in compiled.graph_module.modules() if isinstance(m, StackedAttributes)]


def _assert_grads_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-10)


def test_backward_writes_the_same_grads_as_autograd():
    model, compiled, x = _setup()
    expected = _grads(model, model, x)
    got = _grads(model, compiled, x)
    _assert_grads_equal(got, expected)
    assert [m.mode for m in _stacks(compiled)] == ["flat", "flat"]
    weights = [layer.weight for layer in model.layers]
    # the grads are views of one stacked gradient, laid out like the Parameters
    assert all(w.grad.shape == w.shape and w.grad.is_contiguous() for w in weights)


def test_grads_accumulate_over_backward_calls_like_autograd():
    model, compiled, x = _setup()
    x2 = torch.randn_like(x)
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()
    model(x2).sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    compiled(x).sum().backward()  # grads start as None: assigned
    compiled(x2).sum().backward()  # then added
    _assert_grads_equal([p.grad for p in model.parameters()], expected)
    model.zero_grad(set_to_none=False)  # zeroed in place, then accumulated into
    compiled(x).sum().backward()
    _assert_grads_equal([p.grad for p in model.parameters()], _grads(model, model, x))


def test_training_with_an_optimizer_matches_eager_training():
    torch.manual_seed(0)
    eager, twin = MLP().double(), MLP().double()
    twin.load_state_dict(eager.state_dict())
    compiled = deeppcr.compile(twin, policy="always")
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1, momentum=0.9)
    opt_c = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    for step in range(4):
        x = torch.randn(2, 3, dtype=torch.float64)
        for model, fn, opt in ((eager, eager, opt_e), (twin, compiled, opt_c)):
            opt.zero_grad()
            (fn(x) ** 2).sum().backward()
            opt.step()
    for a, b in zip(eager.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert compiled.report.rewritten


def test_flat_storage_sees_every_kind_of_parameter_update():
    model, compiled, x = _setup()
    compiled(x)
    layer = model.layers[3]
    with torch.no_grad():
        layer.weight.mul_(2.0)  # in place
    torch.testing.assert_close(compiled(x), model(x))
    layer.weight.data = torch.randn(3, 3, dtype=torch.float64)  # .data replaced: re-flattened
    torch.testing.assert_close(compiled(x), model(x))
    state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    torch.testing.assert_close(compiled(x), model(x))
    assert set(compiled.state_dict()) == set(model.state_dict())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k])
    _assert_grads_equal(_grads(model, compiled, x), _grads(model, model, x))


def test_specialisations_share_one_flat_buffer():
    model, compiled, x = _setup()
    compiled(x)
    with torch.no_grad():
        compiled(x)  # a second specialisation (grad mode is part of the signature)
    compiled(torch.randn(5, 3, dtype=torch.float64))  # and a third (batch size)
    weights = [layer.weight for layer in model.layers]
    ptr = weights[0].data_ptr()
    for _ in range(3):
        compiled(x)
        with torch.no_grad():
            compiled(x)
    assert weights[0].data_ptr() == ptr  # no re-flattening back and forth
    assert all(w.untyped_storage().data_ptr() == weights[0].untyped_storage().data_ptr() for w in weights)


def test_without_flat_params_the_parameters_are_untouched():
    model, compiled, x = _setup(flat_params=False)
    ptrs = [p.data_ptr() for p in model.parameters()]
    _assert_grads_equal(_grads(model, compiled, x), _grads(model, model, x))
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert {m.mode for m in _stacks(compiled)} == {"stack"}


def test_autograd_grad_with_and_without_direct_grads():
    for direct in (True, False):
        model, compiled, x = _setup(direct_grads=direct)
        params = list(model.parameters())
        got = torch.autograd.grad(compiled(x).sum(), params)
        _assert_grads_equal(list(got), list(torch.autograd.grad(model(x).sum(), params)))
        assert all(p.grad is None for p in params)


def test_input_gradient_alone_does_not_touch_parameter_grads():
    model, compiled, x = _setup()
    x = x.requires_grad_()
    model.zero_grad(set_to_none=True)
    (gx,) = torch.autograd.grad(compiled(x).sum(), x)
    (ref,) = torch.autograd.grad(model(x).sum(), x)
    torch.testing.assert_close(gx, ref)
    assert all(p.grad is None for p in model.parameters())


def test_hooks_and_frozen_parameters_take_autograd_path():
    model, compiled, x = _setup()
    seen = []
    model.layers[2].weight.register_hook(lambda g: seen.append(g.clone()))
    expected = _grads(model, model, x)
    seen.clear()
    _assert_grads_equal(_grads(model, compiled, x), expected)
    assert len(seen) == 1  # the hook ran: the weights went through autograd's own stack
    model, compiled, x = _setup()
    model.layers[4].weight.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()
    expected = [p.grad for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    compiled(x).sum().backward()
    got = [p.grad for p in model.parameters()]
    assert got[8] is None and expected[8] is None  # layers.4.weight
    _assert_grads_equal([g for g in got if g is not None], [g for g in expected if g is not None])


def test_inplace_update_between_forward_and_backward_is_an_error():
    model, compiled, x = _setup()
    loss = compiled(x).sum()
    with torch.no_grad():
        model.layers[0].weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_inference_mode_stacks_without_flattening():
    model, compiled, x = _setup()
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), model(x))
    _assert_grads_equal(_grads(model, compiled, x), _grads(model, model, x))


def test_gradients_kept_from_an_earlier_step_never_change():
    model, compiled, x = _setup()
    weight = model.layers[1].weight
    compiled(x).sum().backward()
    kept, kept_slice = weight.grad, model.layers[2].weight.grad[0]
    kept_values, slice_values = kept.clone(), kept_slice.clone()
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        (3 * compiled(torch.randn_like(x))).sum().backward()
        torch.testing.assert_close(kept, kept_values, rtol=0, atol=0)
        torch.testing.assert_close(kept_slice, slice_values, rtol=0, atol=0)
    assert weight.grad is not kept
    del kept, kept_slice  # nothing holds the last buffer now: the next step reuses its views
    views = [layer.weight.grad for layer in model.layers]
    del views
    model.zero_grad(set_to_none=True)
    _assert_grads_equal(_grads(model, compiled, x), _grads(model, model, x))
    model.zero_grad(set_to_none=True)
    compiled(x).sum().backward()
    ptr = weight.grad.data_ptr()
    model.zero_grad(set_to_none=True)
    compiled(x).sum().backward()
    assert weight.grad.data_ptr() == ptr  # the views were reused


def test_tensors_replaced_on_every_call_fall_back_to_stacking():
    model, compiled, x = _setup()
    for i in range(6):
        model.layers[0].weight.data = torch.randn(3, 3, dtype=torch.float64)  # a new tensor each call
        torch.testing.assert_close(compiled(x), model(x))
    assert {m.mode for m in _stacks(compiled)} == {"stack", "flat"}  # weights stack per call; biases stay flat
    _assert_grads_equal(_grads(model, compiled, x), _grads(model, model, x))


def test_gradient_kept_alone_from_an_earlier_step_never_changes():
    model, compiled, x = _setup()
    compiled(x).sum().backward()
    kept = model.layers[1].weight.grad  # the tensor itself, no slice of it
    values = kept.clone()
    model.zero_grad(set_to_none=True)
    (5 * compiled(torch.randn_like(x))).sum().backward()
    torch.testing.assert_close(kept, values, rtol=0, atol=0)


class Tied(nn.Module):
    """Layers A, B, A, B, ... (tied weights) and a ModuleList applied twice."""

    def __init__(self, twice: bool):
        super().__init__()
        self.twice = twice
        self.layers = nn.ModuleList(nn.Linear(3, 3) for _ in range(2 if not twice else 6))

    def forward(self, x):
        order = [self.layers[i % 2] for i in range(12)] if not self.twice else list(self.layers) * 2
        for layer in order:
            x = torch.tanh(layer(x))
        return x


@pytest.mark.parametrize("twice", [False, True])
def test_parameters_tied_into_several_steps_get_summed_gradients(twice):
    torch.manual_seed(0)
    model = Tied(twice).double()
    compiled = deeppcr.compile(model, policy="always")
    x = torch.randn(2, 3, dtype=torch.float64)
    _assert_grads_equal(_grads(model, compiled, x), _grads(model, model, x))
    assert compiled.report.rewritten
    with torch.no_grad():
        model.layers[0].weight.mul_(1.5)  # seen by the next call
    torch.testing.assert_close(compiled(x), model(x))


def test_frozen_chain_under_grad_mode_keeps_the_values_it_solved_with():
    model, compiled, x = _setup()
    for p in model.parameters():
        p.requires_grad_(False)
    x = x.requires_grad_()
    out = compiled(x)
    (ref,) = torch.autograd.grad(model(x).sum(), x)
    with torch.no_grad():
        model.layers[0].weight.add_(1.0)  # after the forward pass: must not change this backward
    (gx,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(gx, ref)


def test_unconnected_parameters_reach_only_a_plain_backward():
    """``StackedAttributes.connect = False`` (benchmarks only) leaves the Parameters out of the graph: a plain
    backward still writes the eager gradients; ``torch.autograd.grad`` then finds them unused, which is why
    the default connects them."""
    model, compiled, x = _setup()
    compiled(x)
    for m in _stacks(compiled):
        m.connect = False
    _assert_grads_equal(_grads(model, compiled, x), _grads(model, model, x))
    with pytest.raises(RuntimeError, match="not have been used in the graph"):
        torch.autograd.grad(compiled(x).sum(), [model.layers[0].weight])
