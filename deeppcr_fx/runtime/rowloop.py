"""The compiled iteration's linearisation on CPU as one generated C++ loop over the rows ("row loop"):
``compile_rows(...)(U, x0, per_step, shared, vals, A)`` writes, for every row l = 0..L-1,

    vals[l] = step(Zprev_l, per_step_l, shared)      Zprev_0 = x0, Zprev_l = U[l-1] (read in place, no copy)
    A[l]    = d step / d z at Zprev_l                 in the mode's structure (full: (B, n, n), diag: (B, n))

Why: inside the one inductor graph of ``fused.NewtonIteration`` the linearise (a vmap'd step and its
vmap'd pullback over the n basis cotangents) was the largest part of an iteration: library mm calls
on K = n matrices and scalar transcendental loops over (L, n) that inductor does not vectorise for
small n. One row's work is tiny and fixed-size, so the cloop generator's code on local arrays (the
compiler unrolls its constant loops) does it in one pass over memory.

    trace      ONE row: ``(z, eye, *per_step rows, *shared) -> (f(z), J)`` with ``backend.trace``, J exactly as
               ``jacobians.jacobian_from_pullback`` forms it (vjp, then vmap of the pullback over the basis
               e_i broadcast over the B samples; the basis ``eye`` is an input, so no iota in the graph)
    generate   ``cloop_codegen.StepCodegen`` with two outputs (vals row, A row)
    wrap       for (k = 0; k < L; ++k) { z = k ? U + (k-1)*B*n : x0; a_i = per_step_i + k*row_i; <body> }
               float32 with exp/tanh/sigmoid: blocks of 8 rows, each transcendental op vectorised over the
               block (``vecmath``, ~1-2 ulp), the code between them row by row
    compile    inductor's ``CppPythonBindingsCodeCache`` (cached on disk by source hash), as ``cloop``

The iteration is then split (``RowCall``): this loop, then the compiled graph of the rest
(``fused.RowNewtonIteration``: residual, window, scan, update), which takes (vals, A) as inputs.
The compiled adjoint (full mode) takes its Jacobians at Zprev from the same loop (``AdjointRowCall``,
``fused.RowFullAdjoint``). Anything the generator refuses, another device, dtype or mode raises ``Unsupported``; the caller then
keeps the one-graph iteration (``fused_solve.CompiledForward._build``) and records why.
"""
from __future__ import annotations

import re
from typing import Callable

import torch
from torch.func import vjp, vmap

from . import backend, vecmath
from .cloop import check_inputs, load, loop_inputs
from .cloop_codegen import CTYPE, HELPERS, MAX_STEP_BYTES, StepCodegen
from .cloop_views import Ref, Unsupported, contiguous_strides
from .modes import Mode
from .state import StateSpec

__all__ = ["RowLoop", "RowCall", "AdjointRowCall", "compile_rows", "Unsupported"]

# inductor compiles with -fno-tree-loop-vectorize; the row body's loops over (n, 3n) products vectorise without
# changing a result (GCC keeps the order of floating-point sums): GRU n = 4, 213 -> 186 ns per row, bitwise equal.
# (ATen's vectorised SLEEF exp/tanh per array instead of std:: per element was no faster on 2-4 lanes: GRU n = 2
# 141 vs 70-99 ns per row, n = 4 194 vs 186-213; not kept.)
VECTORIZE = '#pragma GCC optimize ("tree-loop-vectorize")'

# A float32 step with exp/tanh/sigmoid runs in blocks of rows with ``vecmath``'s vectorised functions (L = 4096:
# tanh MLP w = 4 0.39 -> 0.10 ms per pass, GRU n = 2 (T = 10000) 1.21 -> 0.40 ms); False: libm per element.
VECTOR_MATH = True


def row_function(step: Callable, spec: StateSpec, mode: Mode) -> Callable:
    """``(z (B, n), eye (n, n), *per_step rows, *shared) -> (f(z), A)``: one row, A in ``mode``'s structure,
    the same products as ``jacobians.jacobian_from_pullback`` (rows[i, b, j] = J[b, i, j])."""
    def one(z, eye, *args):
        vals, pullback = vjp(lambda z: spec.flatten(step(spec.unflatten(z), *args)), z)
        n = vals.shape[-1]
        basis = eye.view(n, *([1] * (vals.dim() - 1)), n).expand(n, *vals.shape)
        rows = vmap(lambda c: pullback(c)[0])(basis)
        return vals, mode.structure(rows.movedim(0, -2))
    return one


class RowLoop:
    """The compiled row loop of one step, mode and signature (see the module docstring)."""

    def __init__(self, kernel: Callable, source: str, shared_tensors: tuple, eye: torch.Tensor,
                 a_shape: tuple) -> None:
        self.kernel, self.source, self.shared_tensors, self.eye, self.a_shape = kernel, source, shared_tensors, eye, a_shape

    def empty(self, U: torch.Tensor) -> tuple:
        """New (vals, A) buffers for ``U``'s L rows."""
        return torch.empty_like(U, memory_format=torch.contiguous_format), U.new_empty((U.shape[0], *self.a_shape))

    def __call__(self, U: torch.Tensor, x0: torch.Tensor, per_step: tuple, shared: tuple,
                 vals: torch.Tensor, A: torch.Tensor) -> None:
        """Rows at Zprev = (x0, U[0], ..., U[L-2]); ``vals``, ``A`` contiguous, from ``empty``."""
        self._run(x0, U, U.shape[0], per_step, shared, vals, A)

    def at(self, Zprev: torch.Tensor, per_step: tuple, shared: tuple, vals: torch.Tensor, A: torch.Tensor) -> None:
        """Rows at a given Zprev (L, B, n) (the adjoint's)."""
        Zprev = Zprev.detach().contiguous()
        self._run(Zprev[0], Zprev[1:], Zprev.shape[0], per_step, shared, vals, A)

    def _run(self, x0, U, length, per_step, shared, vals, A) -> None:
        tensors = [p.detach().contiguous() for p in per_step]
        tensors += [shared[i].detach().contiguous() for i in self.shared_tensors]
        self.kernel(x0.detach().contiguous(), U.detach().contiguous(), vals, A, length, self.eye, *tensors)


class RowCall:
    """A compiled iteration split in two: ``self(U, x0, start, previous, status, count, *inputs)`` as
    ``fused.NewtonIteration`` takes it; the row loop forms (vals, A), then ``graph`` (the compiled
    ``fused.RowNewtonIteration``) does the rest."""

    linearise_backend = "rows"

    def __init__(self, rows: RowLoop, graph: Callable, n_per_step: int) -> None:
        self.rows, self.graph, self.n_per_step = rows, graph, n_per_step

    def linearise(self, U, x0, inputs) -> tuple:
        vals, A = self.rows.empty(U)
        self.rows(U, x0, inputs[:self.n_per_step], inputs[self.n_per_step:], vals, A)
        return vals, A

    def __call__(self, U, x0, start, previous, status, count, *inputs):
        vals, A = self.linearise(U, x0, inputs)
        return self.graph(U, start, previous, status, count, vals, A)


class AdjointRowCall:
    """The compiled adjoint split in two: ``self(Zprev, G, *inputs)`` as ``fused.FullAdjoint`` takes it; the row
    loop forms the Jacobians at Zprev (its step values are not used), ``graph`` (the compiled
    ``fused.RowFullAdjoint``) does the rest."""

    linearise_backend = "rows"

    def __init__(self, rows: RowLoop, graph: Callable, n_per_step: int) -> None:
        self.rows, self.graph, self.n_per_step = rows, graph, n_per_step

    def jacobians(self, Zprev, inputs) -> torch.Tensor:
        vals, A = self.rows.empty(Zprev)
        self.rows.at(Zprev, inputs[:self.n_per_step], inputs[self.n_per_step:], vals, A)
        return A

    def __call__(self, Zprev, G, *inputs):
        return self.graph(Zprev, G, self.jacobians(Zprev, inputs), *inputs)


def compile_rows(step: Callable, spec: StateSpec, mode: Mode, per_step: tuple, shared: tuple,
                 z: torch.Tensor) -> RowLoop:
    """Generate and compile the row loop for ``step`` in ``mode`` at these inputs' shapes and dtypes (``z``:
    a flat (B, n) state). Raises ``Unsupported`` where it cannot (the reason in the message)."""
    if not mode.linearised:  # the modes that form matrices (full, diag): A is ``mode.structure`` of J
        raise Unsupported(f"mode {mode.name} forms no matrices")
    check_inputs(z, per_step, shared)
    if z.dim() != 2:
        raise Unsupported(f"state of rank {z.dim()}")
    ct = CTYPE[z.dtype]
    B, n = z.shape
    eye = torch.eye(n, dtype=z.dtype)
    rows = tuple(p[0].detach() for p in per_step)
    consts = tuple(s.detach() if isinstance(s, torch.Tensor) else s for s in shared)
    fn = row_function(step, spec, mode)
    with torch.no_grad():
        gm = backend.trace(fn, (z.detach(), eye, *rows, *consts))
        a_shape = tuple(fn(z.detach(), eye, *rows, *consts)[1].shape)

    bn, a_numel = B * n, 1
    for d in a_shape:
        a_numel *= d
    inputs = [Ref("z", z.dtype, (B, n), contiguous_strides((B, n)), writable=False),
              Ref("e", z.dtype, (n, n), contiguous_strides((n, n)), writable=False)]
    step_params, prologue, refs, shared_tensors = loop_inputs(per_step, shared)
    params = [f"const {ct}* x0", f"const {ct}* U", f"{ct}* vals", f"{ct}* jac", "int64_t L", f"const {ct}* e",
              *step_params]
    inputs += refs
    outs = (Ref("ov", z.dtype, (B, n), contiguous_strides((B, n))),
            Ref("oa", z.dtype, a_shape, contiguous_strides(a_shape)))
    row = [f"const {ct}* z = k == 0 ? x0 : U + (k - 1) * {bn};", *prologue,
           f"{ct}* ov = vals + k * {bn};", f"{ct}* oa = jac + k * {a_numel};"]
    head = ["#include <cmath>", "#include <cstdint>", VECTORIZE, HELPERS]
    vector = VECTOR_MATH and z.dtype in vecmath.VECTOR_DTYPES
    blocked = StepCodegen(gm, inputs, outs, vector_math=True) if vector else None
    if blocked is not None and any(vecmath.parse(line) for line in blocked.lines) \
            and blocked.bytes * vecmath.BLOCK_ROWS <= MAX_STEP_BYTES:
        source = "\n".join(head + [vecmath.SOURCE] + _blocked_kernel(params, row, blocked))
        try:
            return RowLoop(load(params, source), source, shared_tensors, eye, a_shape)
        except Exception:  # noqa: BLE001 - a compiler without these vector extensions: the scalar loop below
            pass
    source = "\n".join(head + [
        f'extern "C" void kernel({", ".join(params)}) {{',
        "for (int64_t k = 0; k < L; ++k) {", *row, StepCodegen(gm, inputs, outs).body, "}", "}", ""])
    return RowLoop(load(params, source), source, shared_tensors, eye, a_shape)


def _blocked_kernel(params: list, row: list, cg: StepCodegen) -> list:
    """The kernel over blocks of ``vecmath.BLOCK_ROWS`` rows: each stretch of the body between two vector ops
    runs row by row, each vector op once over the block's rows. An array that one stretch alone uses stays
    that row's local array; the others are block arrays (``B_tN``, row b's slice at ``b * numel``)."""
    n = vecmath.BLOCK_ROWS
    stretches, ops = [[]], []
    for line in cg.lines:
        op = vecmath.parse(line)
        if op is None:
            stretches[-1].append(line)
        else:
            ops.append(op)
            stretches.append([])
    uses = {name: {i for i, lines in enumerate(stretches) if re.search(rf"\b{name}\b", "\n".join(lines))}
            for name, _, _ in cg.temps}
    shared = {name for name, used in uses.items() if len(used) > 1 or any(op[1] == name for op in ops)}
    lines = [f'extern "C" void kernel({", ".join(params)}) {{']
    lines += [f"{t} B_{name}[{n * numel}];" for name, t, numel in cg.temps if name in shared]
    lines += [f"for (int64_t k0 = 0; k0 < L; k0 += {n}) {{", f"const int64_t nb = L - k0 < {n} ? L - k0 : {n};"]
    for i, stretch in enumerate(stretches):
        if stretch:
            lines += ["for (int64_t b = 0; b < nb; ++b) {", "const int64_t k = k0 + b;", *row]
            for name, t, numel in cg.temps:
                if i in uses[name]:
                    lines.append(f"{t}* {name} = B_{name} + b * {numel};" if name in shared else f"{t} {name}[{numel}];")
            lines += stretch + ["}"]
        if i < len(ops):
            function, buf, numel = ops[i]
            lines.append(f"dp_vapply<{function}>(B_{buf}, nb * {numel});")
    return lines + ["}", "}", ""]
