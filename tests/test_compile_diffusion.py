"""Repeated denoising calls driven by diffusers schedulers: found, rewritten, and exact."""
import pytest
import torch

import deeppcr_fx as deeppcr
from compile_helpers import check_structure
from diffusion_zoo import sampler

pytest.importorskip("diffusers")

# scheduler -> (front end that captures the loop, chain length for 10 steps, period)
EXPECTED = {
    # DDPM: randn_tensor branches on model_output.device, so symbolic tracing stops; the recorded run is used.
    # The last step adds no noise (t == 0), so it differs from the others and stays sequential.
    "ddpm": ("record", 9, 2),
    "ddim": ("symbolic", 10, 1),
    "euler": ("symbolic", 10, 2),
}


def _grads(model, out):
    torch.manual_seed(5)
    w = torch.randn_like(out)
    return torch.autograd.grad((out * w).sum(), list(model.denoiser.parameters()))


@pytest.mark.parametrize("kind", sorted(EXPECTED))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sampler_loop(kind, dtype):
    front_end, L, period = EXPECTED[kind]
    model, (x,) = sampler(kind, steps=10, dtype=dtype)
    compiled = deeppcr.compile(model, policy="always")
    torch.manual_seed(1)
    compiled(x)  # first call specialises (the recording front end runs the model once)
    torch.manual_seed(1)
    out = compiled(x)
    after_compiled = torch.randn(4)
    torch.manual_seed(1)
    ref = model(x)
    after_original = torch.randn(4)
    assert torch.equal(after_compiled, after_original)  # the same random draws, in the same order
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    grad_tol = tol
    if kind == "euler" and dtype == torch.float64:
        # EulerDiscreteScheduler.step upcasts to float32 internally whatever the model's dtype, so its
        # gradients carry float32 rounding (sequential backprop and the parallel adjoint round differently)
        grad_tol = dict(rtol=1e-4, atol=1e-5)
    # tolerances relative to the magnitudes (states of ~500 here): the solve's convergence test is too,
    # so an element near zero is as exact as float32 round-off at the state's scale, not at its own
    torch.testing.assert_close(out, ref, rtol=tol["rtol"], atol=tol["atol"] * max(1.0, float(ref.detach().abs().max())))

    report = compiled.report
    assert report.front_end == front_end
    check_structure(compiled, [(L, period)])
    rec = report.rewritten[0]
    assert rec.n_per_step > 0  # schedule coefficients / timestep embeddings are stacked per-step inputs

    torch.manual_seed(1)
    g_out = _grads(model, compiled(x))
    torch.manual_seed(1)
    g_ref = _grads(model, model(x))
    for a, b in zip(g_out, g_ref):
        scale = max(1.0, float(b.detach().abs().max()))
        torch.testing.assert_close(a, b, rtol=grad_tol["rtol"], atol=grad_tol["atol"] * scale)


def test_noise_is_drawn_outside_the_solve():
    """DDPM's pre-sampled noise does not depend on the state: it stays a graph node, stacked per step."""
    model, (x,) = sampler("ddpm", steps=10)
    compiled = deeppcr.compile(model, example_inputs=(x,), policy="always")
    gm = compiled.graph_module
    randn = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.randn]
    assert len(randn) == 9  # one draw per step with t > 0, in the original order
    solve = compiled.report.rewritten[0].submodule
    template = gm.get_submodule(solve).step
    assert not any(n.target is torch.randn for n in template.graph.nodes)


def test_example_inputs_output_is_not_reused_for_other_inputs():
    model, (x,) = sampler("ddim", steps=10)
    compiled = deeppcr.compile(model, example_inputs=(x,), policy="always", front_end="record")
    y = torch.randn_like(x)
    torch.testing.assert_close(compiled(y), model(y), rtol=1e-4, atol=1e-5)
    assert compiled.report.front_end == "record" and compiled.report.rewritten


def test_ddpm_with_a_generator_draws_the_same_noise():
    from diffusion_zoo import Sampler, make_scheduler

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(123)
    model = Sampler(make_scheduler("ddpm"), 10, generator=gen)
    x = torch.randn(2, 8)
    compiled = deeppcr.compile(model, policy="always")
    compiled(x)  # records (runs the original once)
    gen.manual_seed(42)
    out = compiled(x)
    state_after = gen.get_state()
    gen.manual_seed(42)
    ref = model(x)
    assert torch.equal(gen.get_state(), state_after)  # the same number of draws from the user's generator
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert compiled.report.front_end == "record" and [c.length for c in compiled.report.rewritten] == [9]
