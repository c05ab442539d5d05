"""A diffusers pipeline whose sampling loop is solved in parallel: ``compile_pipeline(pipe, **options)``.

A pipeline is not an ``nn.Module``: its ``__call__`` draws the starting noise, runs the sampling
loop in Python (``for t in scheduler.timesteps: x = scheduler.step(unet(x, t).sample, t, x).prev_sample``)
and post-processes the result. ``compile_pipeline`` returns a ``CompiledPipeline`` that does the same
with the loop as a module (``SamplingLoop``) compiled by ``deeppcr.compile``, so the loop's steps
become one parallel solve; everything else is the pipeline's own code, in the same order:

    noise = randn_tensor(shape, generator)          # as the pipeline draws it
    image = compiled_loop(noise)                    # SamplingLoop, compiled once per loop setting
    image = (image / 2 + 0.5).clamp(0, 1) ...       # as the pipeline post-processes it

Loop settings are guarded: each distinct ``(num_inference_steps, eta, ...)``, unet, scheduler (its
class, config object and schedule tensors) and kind of generator gets its own compiled loop (at most
``MAX_LOOPS``, least recently used dropped), so changing a setting specialises again instead of
reusing a loop traced for another. Random draws inside the loop (DDPM's noise) come from a generator
the compiled loop owns: its state is copied from the caller's generator before the loop and back
after, so the caller's generator advances exactly as the original pipeline advances it, and the
output equals the original's for the same generator.

Supported: ``DDPMPipeline`` and ``DDIMPipeline`` (and subclasses): unconditional image pipelines with a
``unet`` and a ``scheduler`` — whatever scheduler they are given. Other pipelines raise
``CompileError`` naming these; compile their denoiser instead (``deeppcr.compile(pipe.unet)``), which
drops into any pipeline.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional

import torch

from .results import CompileError

MAX_LOOPS = 8  # compiled loops kept per pipeline (distinct loop settings)

# pipeline class name -> (its __call__'s loop keywords with their defaults, the ones scheduler.step takes)
_LOOPS = {
    "DDPMPipeline": ({"num_inference_steps": 1000}, ()),
    "DDIMPipeline": ({"num_inference_steps": 50, "eta": 0.0, "use_clipped_model_output": None},
                     ("eta", "use_clipped_model_output")),
}


class SamplingLoop(torch.nn.Module):
    """The denoising loop of an unconditional image pipeline, as a module: ``forward(noise) -> sample``.

    Written as the pipelines write it (``set_timesteps`` first, then one ``unet`` call and one
    ``scheduler.step`` per timestep); ``generator`` is the one every step's random draws use.
    """

    def __init__(self, unet: torch.nn.Module, scheduler: Any, num_inference_steps: int, step_kwargs: dict,
                 generator: Optional[torch.Generator]) -> None:
        super().__init__()
        self.unet = unet
        object.__setattr__(self, "scheduler", scheduler)  # not a module: Python state the trace reads
        self.num_inference_steps = num_inference_steps
        object.__setattr__(self, "step_kwargs", dict(step_kwargs))
        object.__setattr__(self, "generator", generator)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        self.scheduler.set_timesteps(self.num_inference_steps)
        for t in self.scheduler.timesteps:
            model_output = self.unet(image, t).sample
            image = self.scheduler.step(model_output, t, image, generator=self.generator,
                                        **self.step_kwargs).prev_sample
        return image


def _kind(pipe: Any) -> str:
    for cls in type(pipe).__mro__:
        if cls.__name__ in _LOOPS:
            return cls.__name__
    raise CompileError(f"deeppcr.compile: {type(pipe).__name__} is not a supported pipeline (supported: "
                       f"{', '.join(sorted(_LOOPS))}); compile its denoiser instead: "
                       "pipe.unet = deeppcr.compile(pipe.unet)")


def _schedule_key(scheduler: Any) -> tuple:
    """What the traced loop baked in from the scheduler: its class, config object and schedule tensors."""
    tensors = tuple((k, id(v), v._version) for k, v in sorted(vars(scheduler).items())
                    if isinstance(v, torch.Tensor) and k in ("betas", "alphas", "alphas_cumprod", "final_alpha_cumprod"))
    return (type(scheduler), id(scheduler.config), tensors)


class CompiledPipeline:
    """``pipe`` with its sampling loop compiled: call it as the pipeline; other attributes are the pipeline's."""

    def __init__(self, pipe: Any, options: dict) -> None:
        object.__setattr__(self, "pipeline", pipe)
        object.__setattr__(self, "_kind", _kind(pipe))
        object.__setattr__(self, "_options", dict(options))
        object.__setattr__(self, "_loops", OrderedDict())  # key -> (CompiledModule, owned generator or None)

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "pipeline"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.pipeline, name, value)  # pipe.scheduler = ...: the next call specialises for it

    @property
    def loops(self) -> list:
        """The compiled loops, most recently used last (each a ``CompiledModule``: ``.report``, ``.stats()``)."""
        return [compiled for compiled, _ in self._loops.values()]

    @property
    def report(self):
        """The report of the most recently used loop (None before the first call)."""
        return self.loops[-1].report if self._loops else None

    def _loop(self, settings: dict, generator: Optional[torch.Generator], device: torch.device):
        from .api import compile as compile_module  # api may import this module: no import cycle at load

        pipe = self.pipeline
        defaults, step_keys = _LOOPS[self._kind]
        key = (id(pipe.unet), _schedule_key(pipe.scheduler), tuple(sorted(settings.items())),
               None if generator is None else str(generator.device))
        if key in self._loops:
            self._loops.move_to_end(key)
            return self._loops[key]
        owned = None if generator is None else torch.Generator(device=generator.device)
        unet = getattr(getattr(pipe.unet, "_builder", None), "model", pipe.unet)  # a compiled unet: its model
        loop = SamplingLoop(unet, pipe.scheduler, settings["num_inference_steps"],
                            {k: settings[k] for k in step_keys}, owned)
        entry = (compile_module(loop, **self._options), owned)
        self._loops[key] = entry
        while len(self._loops) > MAX_LOOPS:
            self._loops.popitem(last=False)
        return entry

    @torch.no_grad()  # as the pipelines' __call__
    def __call__(self, batch_size: int = 1, generator: Optional[torch.Generator] = None, output_type: Optional[str] = "pil",
                 return_dict: bool = True, **loop_settings: Any):
        from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
        from diffusers.utils.torch_utils import randn_tensor

        pipe = self.pipeline
        defaults, _ = _LOOPS[self._kind]
        unknown = set(loop_settings) - set(defaults)
        if unknown:
            raise TypeError(f"{type(pipe).__name__}.__call__() got unexpected keyword arguments {sorted(unknown)}")
        if isinstance(generator, list):  # one generator per image: run the pipeline as written
            return pipe(batch_size=batch_size, generator=generator, output_type=output_type, return_dict=return_dict,
                        **loop_settings)
        settings = {**defaults, **loop_settings}
        config = pipe.unet.config
        size = config.sample_size
        shape = (batch_size, config.in_channels, *((size, size) if isinstance(size, int) else size))
        device = pipe._execution_device
        if device.type == "mps":  # as DDPMPipeline draws it
            image = randn_tensor(shape, generator=generator, dtype=pipe.unet.dtype).to(device)
        else:
            image = randn_tensor(shape, generator=generator, device=device, dtype=pipe.unet.dtype)
        compiled, owned = self._loop(settings, generator, device)
        if owned is not None:
            owned.set_state(generator.get_state())
        image = compiled(image)
        if owned is not None:
            generator.set_state(owned.get_state())
        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                image = pipe.numpy_to_pil(image)
        pipe.maybe_free_model_hooks()
        return (image,) if not return_dict else ImagePipelineOutput(images=image)


def compile_pipeline(pipe: Any, **options: Any) -> CompiledPipeline:
    """``pipe`` (a diffusers ``DDPMPipeline`` or ``DDIMPipeline``) with its sampling loop solved in parallel.

    Arguments:
        pipe: the pipeline; it is not modified (its unet and scheduler are used as they are at each call).
        **options: ``deeppcr.compile`` keywords for the loop (``policy``, ``jacobian``, ``config``, ...).

    Returns:
        A ``CompiledPipeline``: ``compiled(batch_size=1, generator=g, num_inference_steps=..., output_type=...)``
        returns what ``pipe(...)`` returns for the same arguments; ``compiled.report`` is the last loop's report.
    """
    return CompiledPipeline(pipe, options)
