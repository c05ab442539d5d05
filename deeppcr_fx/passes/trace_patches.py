"""The process-wide patches a symbolic trace lives with (``passes/trace.py``).

- torch.fx patches ``nn.Module.__call__``/``__getattr__`` (and wrapped functions) for the whole
  process while it traces: ``_own_thread_patches`` makes them act in the tracing thread only, and
  ``_TRACE_LOCK`` keeps two of our traces from overlapping.
- ``_random_as_nodes`` records ``torch.randn(...)`` and the other draws as graph nodes while tracing,
  so that they are drawn on every call instead of once at trace time.
"""
from __future__ import annotations

import builtins
import contextlib
import functools
import threading
from typing import Callable

import torch
import torch.fx as fx
from torch.fx._symbolic_trace import _Patcher

# torch.fx patches ``nn.Module.__call__``/``__getattr__`` (and wrapped functions in module globals)
# process-wide while it traces. Two of our traces never overlap (a second tracer would find the first
# one's patches in place and record into the first one's graph), and ``_own_thread_patches`` makes
# every patch a no-op for other threads, which keep calling their modules as usual meanwhile.
_TRACE_LOCK = threading.RLock()


def _for_this_thread(new_fn: Callable, orig_fn: Callable) -> Callable:
    owner = threading.get_ident()

    @functools.wraps(new_fn)
    def patched(*args, **kwargs):
        if threading.get_ident() == owner:
            return new_fn(*args, **kwargs)
        return orig_fn(*args, **kwargs)

    return patched


@contextlib.contextmanager
def _own_thread_patches():
    """While tracing, torch.fx's patches act only in the tracing thread."""
    patch, patch_method = _Patcher.patch, _Patcher.patch_method

    def thread_patch(self, frame_dict, name, new_fn, deduplicate=True):
        orig = frame_dict[name] if name in frame_dict else getattr(builtins, name, None)
        return patch(self, frame_dict, name, _for_this_thread(new_fn, orig), deduplicate)

    def thread_patch_method(self, cls, name, new_fn, deduplicate=True):
        return patch_method(self, cls, name, _for_this_thread(new_fn, getattr(cls, name)), deduplicate)

    _Patcher.patch, _Patcher.patch_method = thread_patch, thread_patch_method
    try:
        yield
    finally:
        _Patcher.patch, _Patcher.patch_method = patch, patch_method


# Random draws whose arguments are all concrete (``torch.randn(h.shape)``: shapes are concrete while
# tracing) would run once at trace time and become a constant: the same "noise" on every call, and an
# RNG that never advances. While tracing they are recorded as graph nodes instead, drawn on every call.
_RANDOM = ("rand", "randn", "randint", "randperm", "normal", "bernoulli", "poisson", "multinomial",
           "rand_like", "randn_like", "randint_like")


_DRAWING = threading.local()  # .tracer: the tracer recording random draws in this thread, if any
_DRAWS: dict = {}  # name -> the one patched function: torch's caches may keep it, so it holds no tracer


def _draw(fn: Callable) -> Callable:
    def draw(*args, **kwargs):
        tracer = getattr(_DRAWING, "tracer", None)
        if tracer is None:  # another thread, or no trace running
            return fn(*args, **kwargs)
        return tracer.create_proxy("call_function", fn, args, kwargs)
    return draw


@contextlib.contextmanager
def _random_as_nodes(tracer: fx.Tracer):
    originals = {name: getattr(torch, name) for name in _RANDOM if hasattr(torch, name)}
    previous, _DRAWING.tracer = getattr(_DRAWING, "tracer", None), tracer
    try:
        for name, fn in originals.items():
            setattr(torch, name, _DRAWS.setdefault(name, _draw(fn)))
        yield
    finally:
        _DRAWING.tracer = previous
        for name, fn in originals.items():
            setattr(torch, name, fn)
