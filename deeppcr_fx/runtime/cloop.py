"""The sequential finish on CPU as one generated C++ loop: ``compile_loop(...)(start, U, x0)`` overwrites
rows ``start..L-1`` of ``U`` with ``z_l = step(z_{l-1}, per_step_l, shared)`` in one call.

Why: the compiled chunk of K unrolled steps (``fused.SequentialChunk``) runs inductor's C++ kernel at
~50 ns per step, but its Python wrapper allocates every step's intermediate buffers on each call, so the
finish ran 17-80x slower than a jitted ``jax.lax.scan``. Here the loop itself is C++:

    trace      one step, ``(z, *per_step rows, *shared) -> z'`` (flat state), with ``backend.trace``:
               the functional aten graph with inductor's decompositions, static shapes
    generate   ``cloop_codegen.StepCodegen``: the step as C++ statements on fixed-size local arrays (views:
               ``cloop_views``, no code)
    wrap       for (k = lo; k < hi; ++k) { a_i = per_step_i + k * row_i; <step: z -> o = out + k*B*n>; z = o; }
    compile    inductor's ``CppPythonBindingsCodeCache`` (its compiler and flags; the .so is cached on disk by
               source hash, so a later process only loads it); called with tensors as inductor calls its kernels

A step the generator does not translate raises ``Unsupported`` (the caller keeps the
inductor chunks and records why).
"""
from __future__ import annotations

from typing import Callable

import torch

from . import backend
from .cloop_codegen import CTYPE, HELPERS, StepCodegen
from .cloop_views import Ref, Unsupported, contiguous_strides
from .state import StateSpec

__all__ = ["SequentialLoop", "compile_loop", "check_inputs", "loop_inputs", "load", "Unsupported"]


class SequentialLoop:
    """The compiled loop of one step and signature; ``self(start, U, x0, per_step, shared)`` fills
    ``U[start:]`` (U contiguous (L, B, n), in the dtype it was compiled for)."""

    def __init__(self, kernel: Callable, source: str, shared_tensors: tuple) -> None:
        self.kernel, self.source, self.shared_tensors = kernel, source, shared_tensors

    def __call__(self, start: int, U: torch.Tensor, x0: torch.Tensor, per_step: tuple, shared: tuple) -> None:
        if not U.is_contiguous():
            raise ValueError("the sequential loop writes a contiguous U")
        z0 = (x0 if start == 0 else U[start - 1]).contiguous()
        tensors = [p.contiguous() for p in per_step] + [shared[i].contiguous() for i in self.shared_tensors]
        self.kernel(z0, U, start, U.shape[0], *tensors)


def compile_loop(step: Callable, spec: StateSpec, per_step: tuple, shared: tuple, z: torch.Tensor) -> SequentialLoop:
    """Generate and compile the loop for ``step`` at these inputs' shapes and dtypes (``z``: a flat (B, n)
    state). Raises ``Unsupported`` for a step outside the generator's op set."""
    check_inputs(z, per_step, shared)
    ct = CTYPE[z.dtype]

    def one(z, *args):
        return spec.flatten(step(spec.unflatten(z), *args))

    rows = tuple(p[0].detach() for p in per_step)
    consts = tuple(s.detach() if isinstance(s, torch.Tensor) else s for s in shared)
    with torch.no_grad():
        gm = backend.trace(one, (z.detach(), *rows, *consts))

    # the placeholders' Refs: the state z, per-step rows a_i (at row k), shared tensors s_i
    state = Ref("z", z.dtype, tuple(z.shape), contiguous_strides(z.shape), writable=False)
    params, prologue, refs, shared_tensors = loop_inputs(per_step, shared)
    params = [f"const {ct}* z0", f"{ct}* out", "int64_t lo", "int64_t hi", *params]
    inputs = [state, *refs]
    out = Ref("o", z.dtype, tuple(z.shape), contiguous_strides(z.shape))
    body = StepCodegen(gm, inputs, out).body

    source = "\n".join([
        "#include <cmath>", "#include <cstdint>", HELPERS,
        f'extern "C" void kernel({", ".join(params)}) {{',
        f"const {ct}* z = z0;",
        "for (int64_t k = lo; k < hi; ++k) {",
        *prologue,
        f"{ct}* o = out + k * {z.numel()};",
        body,
        "z = o;", "}", "}", ""])
    return SequentialLoop(load(params, source), source, shared_tensors)


def check_inputs(z: torch.Tensor, per_step: tuple, shared: tuple) -> None:
    """``Unsupported`` unless the state and every tensor input are float32/float64 on CPU."""
    if z.device.type != "cpu" or any(isinstance(t, torch.Tensor) and t.device.type != "cpu"
                                     for t in (*per_step, *shared)):
        raise Unsupported("not on CPU")
    dtypes = {z.dtype, *(t.dtype for t in (*per_step, *shared) if isinstance(t, torch.Tensor))}
    if not dtypes <= {torch.float32, torch.float64}:
        raise Unsupported(f"input dtypes {sorted(map(str, dtypes))}")


def loop_inputs(per_step: tuple, shared: tuple) -> tuple:
    """``(params, prologue, refs, shared_tensors)`` of a loop over rows k: a C parameter per per-step tensor
    (``in_i``, its row k read as ``a_i``) and per shared tensor (``s_i``), the prologue lines that point
    ``a_i`` at row k, the generator's Refs for them (a non-tensor shared value stays a Python value), and the
    indices of the shared values that are tensors (passed to the kernel)."""
    params, prologue, refs = [], [], []
    for i, p in enumerate(per_step):
        t = CTYPE[p.dtype]
        params.append(f"const {t}* in{i}")
        prologue.append(f"const {t}* a{i} = in{i} + k * {p[0].numel()};")
        refs.append(Ref(f"a{i}", p.dtype, tuple(p.shape[1:]), contiguous_strides(p.shape[1:]), writable=False))
    shared_tensors = tuple(i for i, s in enumerate(shared) if isinstance(s, torch.Tensor))
    for i, s in enumerate(shared):
        if isinstance(s, torch.Tensor):
            params.append(f"const {CTYPE[s.dtype]}* s{i}")
            refs.append(Ref(f"s{i}", s.dtype, tuple(s.shape), contiguous_strides(s.shape), writable=False))
        else:
            refs.append(s)
    return params, prologue, refs, shared_tensors


def load(params: list, source: str) -> Callable:
    """Compile ``source``'s ``kernel(params...)`` with inductor's C++ toolchain (cached on disk by source hash)
    and return it, called with tensors and ints as inductor calls its kernels."""
    from torch._inductor.codecache import CppPythonBindingsCodeCache

    argtypes = [p.rsplit(" ", 1)[0] for p in params]
    return CppPythonBindingsCodeCache.load_pybinding(argtypes, source, needs_vec_isa=False)
