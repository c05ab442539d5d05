"""Tiny diffusion samplers driven by diffusers schedulers (random denoisers, no downloads).

``Sampler.forward(x)`` is the loop users write::

    for t in scheduler.timesteps:
        x = scheduler.step(denoiser(x, t), t, x).prev_sample
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


class Denoiser(nn.Module):
    """eps(x, t): an MLP with a sinusoidal timestep embedding (the same module every step)."""

    def __init__(self, w=8, emb=8):
        super().__init__()
        half = emb // 2
        self.register_buffer("freqs", torch.exp(-math.log(1000.0) * torch.arange(half) / half))
        self.temb = nn.Linear(emb, w)
        self.inp = nn.Linear(w, w)
        self.out = nn.Linear(w, w)

    def forward(self, x, t):
        args = t.to(x.dtype).reshape(1) * self.freqs.to(x.dtype)
        emb = torch.cat([torch.sin(args), torch.cos(args)]).unsqueeze(0)
        h = torch.tanh(self.inp(x) + self.temb(emb))
        return 0.5 * self.out(h)


class Sampler(nn.Module):
    def __init__(self, scheduler, steps, w=8, generator=None):
        super().__init__()
        self.denoiser = Denoiser(w)
        self.scheduler = scheduler
        self.steps = steps
        self.generator = generator
        scheduler.set_timesteps(steps)

    def forward(self, x):
        self.scheduler._step_index = None  # restart the scheduler's step counter (as set_timesteps does)
        x = x * self.scheduler.init_noise_sigma
        for t in self.scheduler.timesteps:
            eps = self.denoiser(self.scheduler.scale_model_input(x, t), t)
            kwargs = {} if self.generator is None else {"generator": self.generator}
            x = self.scheduler.step(eps, t, x, **kwargs).prev_sample
        return x


def make_scheduler(kind: str):
    import diffusers

    common = dict(num_train_timesteps=1000)
    if kind == "ddpm":
        return diffusers.DDPMScheduler(**common)
    if kind == "ddim":
        return diffusers.DDIMScheduler(**common)
    if kind == "euler":
        return diffusers.EulerDiscreteScheduler(**common)
    raise ValueError(kind)


def sampler(kind: str, steps: int = 10, w: int = 8, dtype=torch.float32):
    torch.manual_seed(0)
    return Sampler(make_scheduler(kind), steps, w).to(dtype), (torch.randn(2, w, dtype=dtype),)


# --- the diffusers zoo (tests/test_zoo_diffusers.py) ---------------------------------------------------
SCHEDULERS = {
    "ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler", "dpm_multistep": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler", "deis": "DEISMultistepScheduler", "heun": "HeunDiscreteScheduler",
    "lcm": "LCMScheduler", "flow_match_euler": "FlowMatchEulerDiscreteScheduler",
}


class Loop(nn.Module):
    """A sampling loop as users (and diffusers' pipelines) write it: ``set_timesteps`` in forward, then one
    denoiser call and one ``scheduler.step`` per timestep."""

    def __init__(self, scheduler, steps: int, w: int = 8):
        super().__init__()
        self.denoiser = Denoiser(w)
        self.scheduler = scheduler
        self.steps = steps

    def forward(self, x):
        scheduler = self.scheduler
        scheduler.set_timesteps(self.steps)
        x = x * getattr(scheduler, "init_noise_sigma", 1.0)
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
            x = scheduler.step(self.denoiser(model_input, t), t, x).prev_sample
        return x


class NoiseInLoop(Loop):
    """DDIM with ``eta=1`` whose per-step noise is passed in (``noise``: ``(steps, *x.shape)``), not drawn."""

    def forward(self, x, noise):
        scheduler = self.scheduler
        scheduler.set_timesteps(self.steps)
        for i, t in enumerate(scheduler.timesteps):
            x = scheduler.step(self.denoiser(x, t), t, x, eta=1.0, variance_noise=noise[i]).prev_sample
        return x


def zoo_scheduler(kind: str):
    import diffusers

    cls = getattr(diffusers, SCHEDULERS[kind])
    return cls() if kind == "flow_match_euler" else cls(num_train_timesteps=1000)


def zoo_loop(kind: str, steps: int = 10, w: int = 8, dtype=torch.float64):
    torch.manual_seed(0)
    return Loop(zoo_scheduler(kind), steps, w).to(dtype)


def tiny_unet(dtype=torch.float64):
    """A UNet2DModel of two down and two up blocks, 8 and 16 channels, on 1x4x4 images (no attention)."""
    import diffusers

    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=4, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), add_attention=False, norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).to(dtype)
