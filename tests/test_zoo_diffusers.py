"""The diffusers zoo: every scheduler family driving a denoiser in the loop users write, found, rewritten, exact.

Each case is ``diffusion_zoo.Loop`` (``set_timesteps`` in forward, one denoiser call and one
``scheduler.step`` per timestep, random draws inside the scheduler where it draws) in float64,
compiled with ``policy="always"``: outputs and the denoiser's parameter gradients equal eager's.
Multistep schedulers carry the sample plus a history of model outputs (a state of several tensors,
``passes/find_states.py``); Heun's two sub-steps per timestep form one step of the chain (the state
between sub-steps is three tensors, between timesteps one). A tiny ``UNet2DModel`` runs inside
``DDPMPipeline``/``DDIMPipeline`` through ``deeppcr_fx.pipelines.compile_pipeline``.
"""
import pytest
import torch

import deeppcr_fx as deeppcr
from diffusion_zoo import Loop, NoiseInLoop, Sampler, make_scheduler, tiny_unet, zoo_loop, zoo_scheduler

diffusers = pytest.importorskip("diffusers")

STEPS = 10
# scheduler -> (chain length for 10 timesteps, tensors in the state). Lengths below 10: steps that
# differ from the others stay sequential (DDPM's last step adds no noise; multistep solvers' first
# steps are lower order and their last steps lower order again; Heun's 10 timesteps are 19 sub-steps).
EXPECTED = {
    "ddpm": (9, 1), "ddim": (10, 1), "euler": (10, 1), "euler_ancestral": (10, 1),
    "dpm_multistep": (8, 2), "unipc": (7, 3), "deis": (8, 2), "heun": (9, 1), "lcm": (9, 1),
    "flow_match_euler": (10, 1),
}


def _loss_grads(model, out):
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    return torch.autograd.grad((out * weights).sum(), list(model.denoiser.parameters()))


def _close(got, want, rtol):
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * max(1.0, float(want.detach().abs().max())))


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_scheduler_loop(kind):
    L, components = EXPECTED[kind]
    model = zoo_loop(kind, steps=STEPS)
    x = torch.randn(2, 8, dtype=torch.float64)
    compiled = deeppcr.compile(model, policy="always", min_length=4)
    compiled(x)  # specialises (the recording front end runs the model once: its output is eager's)
    torch.manual_seed(1)
    out = compiled(x)
    torch.manual_seed(1)
    ref = model(x)
    _close(out, ref, 1e-9)
    rewritten = compiled.report.rewritten
    assert compiled.report.front_end in ("symbolic", "record")
    assert [(r.length, r.state.count(",") + 1) for r in rewritten] == [(L, components)]
    forward = compiled.graph_module.get_submodule(rewritten[0].submodule).last_stats.forward
    assert forward.converged or forward.sequential_finish is not None  # exact either way
    # gradients (EulerDiscreteScheduler and its kin compute in float32 inside step: looser there)
    rtol = 1e-4 if kind in ("euler", "euler_ancestral", "heun", "lcm") else 1e-7
    torch.manual_seed(2)
    got = _loss_grads(model, compiled(x))
    torch.manual_seed(2)
    want = _loss_grads(model, model(x))
    for g, w in zip(got, want):
        _close(g, w, rtol)


# more scheduler settings, 12 timesteps: (scheduler, its options) -> (L, tensors in the state)
MORE = {
    ("DPMSolverMultistepScheduler", (("algorithm_type", "sde-dpmsolver++"),)): (10, 2),  # noise drawn per step
    ("DPMSolverMultistepScheduler", (("solver_order", 3),)): (7, 3),
    ("PNDMScheduler", ()): (8, 4),  # four past model outputs
    ("LMSDiscreteScheduler", ()): (8, 4),  # per-step coefficients with a state of four tensors
}


@pytest.mark.parametrize("name, options", sorted(MORE), ids=lambda v: v if isinstance(v, str) else "-")
def test_more_scheduler_settings(name, options):
    L, components = MORE[(name, options)]
    torch.manual_seed(0)
    model = Loop(getattr(diffusers, name)(num_train_timesteps=1000, **dict(options)), 12).double()
    x = torch.randn(2, 8, dtype=torch.float64)
    compiled = deeppcr.compile(model, policy="always", min_length=4)
    compiled(x)
    torch.manual_seed(1)
    out = compiled(x)
    torch.manual_seed(1)
    _close(out, model(x), 1e-9)
    assert [(r.length, r.state.count(",") + 1) for r in compiled.report.rewritten] == [(L, components)]
    # the runs left sequential are reported with their reasons (too short here, or a float32 hop in shape)
    assert all(r.reason is not None for r in compiled.report.chains if r.status != "rewritten")


def test_noise_passed_in():
    """DDIM with eta=1 reading each step's noise from an input: the noise is a stacked per-step input."""
    torch.manual_seed(0)
    model = NoiseInLoop(zoo_scheduler("ddim"), STEPS).double()
    x, noise = torch.randn(2, 8, dtype=torch.float64), torch.randn(STEPS, 2, 8, dtype=torch.float64)
    compiled = deeppcr.compile(model, policy="always")
    _close(compiled(x, noise), model(x, noise), 1e-9)
    (record,) = compiled.report.rewritten
    assert record.length == STEPS and record.n_per_step >= 1
    noise2 = torch.randn_like(noise)
    _close(compiled(x, noise2), model(x, noise2), 1e-9)


def test_a_changed_step_count_specialises_again():
    """``num_inference_steps`` read in forward (``set_timesteps(self.steps)``) is guarded: a new value, a new chain."""
    model = zoo_loop("dpm_multistep", steps=STEPS)
    x = torch.randn(2, 8, dtype=torch.float64)
    compiled = deeppcr.compile(model, policy="always", min_length=4)
    _close(compiled(x), model(x), 1e-9)
    model.steps = 14
    _close(compiled(x), model(x), 1e-9)
    assert [r.length for r in compiled.report.rewritten] == [12]


def test_set_timesteps_outside_forward_is_noticed():
    """The scheduler is Python state the trace read (passes/reads.py guards its timesteps): a new schedule,
    set outside forward, specialises again instead of reusing the old one."""
    torch.manual_seed(0)
    model = Sampler(make_scheduler("ddim"), 10).double()  # set_timesteps once, in __init__
    x = torch.randn(2, 8, dtype=torch.float64)
    compiled = deeppcr.compile(model, policy="always")
    compiled(x)
    model.scheduler.set_timesteps(6)
    _close(compiled(x), model(x), 1e-9)
    model.scheduler.set_timesteps(10)
    _close(compiled(x), model(x), 1e-9)


# --- pipelines --------------------------------------------------------------------------------------
def _pipelines():
    unet = tiny_unet()
    return {"ddpm": diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(num_train_timesteps=1000)),
            "ddim": diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler(num_train_timesteps=1000))}


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_compile_pipeline_matches_the_pipeline(kind):
    from deeppcr_fx.pipelines import compile_pipeline

    pipe = _pipelines()[kind]
    pipe.set_progress_bar_config(disable=True)
    compiled = compile_pipeline(pipe, policy="always", min_length=4, jacobian="identity")  # Picard: cheap on a CPU
    assert compiled.unet is pipe.unet and compiled.scheduler is pipe.scheduler  # the pipeline's own parts
    first = 5 if kind == "ddpm" else 4  # DDPM's last step adds no noise: L = steps - 1
    for steps in (first, first + 1):
        gen = torch.Generator().manual_seed(7)
        got = compiled(generator=gen, num_inference_steps=steps, output_type="pt").images
        state = gen.get_state()
        gen = torch.Generator().manual_seed(7)
        want = pipe(generator=gen, num_inference_steps=steps, output_type="pt").images
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        assert torch.equal(state, gen.get_state())  # the caller's generator advanced as the pipeline advances it
        assert [r.length for r in compiled.report.rewritten] == [steps - 1 if kind == "ddpm" else steps]
    assert len(compiled.loops) == 2  # one compiled loop per step count
    images = compiled(generator=torch.Generator().manual_seed(7), num_inference_steps=first).images  # PIL, as pipe's
    assert len(images) == 1 and images[0].size == (4, 4)


def test_compiled_unet_drops_into_a_pipeline():
    pipe = _pipelines()["ddpm"]
    pipe.set_progress_bar_config(disable=True)
    mixed = diffusers.DDPMPipeline(unet=deeppcr.compile(pipe.unet), scheduler=pipe.scheduler)
    mixed.set_progress_bar_config(disable=True)
    got = mixed(generator=torch.Generator().manual_seed(3), num_inference_steps=3, output_type="pt").images
    want = pipe(generator=torch.Generator().manual_seed(3), num_inference_steps=3, output_type="pt").images
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    from deeppcr_fx.pipelines import compile_pipeline  # and its loop compiled around the compiled unet's model

    looped = compile_pipeline(mixed, policy="always", min_length=2, jacobian="identity")
    got = looped(generator=torch.Generator().manual_seed(3), num_inference_steps=3, output_type="pt").images
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert [r.length for r in looped.report.rewritten] == [2] and looped.loops[0].report.model == "SamplingLoop"


def test_unsupported_pipelines_say_what_to_do():
    from deeppcr_fx.pipelines import compile_pipeline

    class Other:
        unet = scheduler = None

    with pytest.raises(deeppcr.DeepPCRError, match="pipe.unet = deeppcr.compile"):
        compile_pipeline(Other())


def test_a_unet_in_the_loop():
    """The loop users write around a UNet2DModel (``.sample`` of its output), without a pipeline."""

    class UNetLoop(Loop):
        def __init__(self):
            torch.nn.Module.__init__(self)
            self.unet, self.scheduler, self.steps = tiny_unet(), zoo_scheduler("ddim"), 4

        def forward(self, x):
            self.scheduler.set_timesteps(self.steps)
            for t in self.scheduler.timesteps:
                x = self.scheduler.step(self.unet(x, t).sample, t, x).prev_sample
            return x

    model = UNetLoop()
    x = torch.randn(1, 1, 4, 4, dtype=torch.float64)
    compiled = deeppcr.compile(model, policy="always", min_length=4)
    _close(compiled(x), model(x), 1e-9)
    assert [r.length for r in compiled.report.rewritten] == [4]
