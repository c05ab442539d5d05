"""Evaluate a user's step function on many steps at once, in the solver's flat layout.

``Steps`` wraps ``step(z, *per_step_slices, *shared)`` and offers the batched calls the
Newton driver and the adjoint need, all on flat states ``(rows, B, n)``:

- ``batched(lo, hi)``: a function ``Zprev -> Znext`` for steps ``lo..hi-1`` in one call:
  ``torch.func.vmap`` over the stacked per-step inputs, or a per-step loop when vmap
  cannot handle an op (``vectorize="auto"``; the reason is kept in ``vmap_error``).
- ``single(l, z)``: step ``l`` alone, for sequential finishes.

Per-step and shared tensors are closed over, so ``torch.func`` transforms of these
functions differentiate with respect to the state only; the backward pass gets parameter
gradients through ``batched_with_params``.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Sequence

import torch
from torch.func import vmap

from ..results import VectorizeError
from .state import StateSpec

logger = logging.getLogger(__name__)


class Steps:
    def __init__(self, step: Callable, spec: StateSpec, per_step: Sequence[torch.Tensor],
                 shared: Sequence, vectorize: object) -> None:
        self.step = step
        self.spec = spec
        self.per_step = tuple(per_step)
        self.shared = tuple(shared)
        self.vectorize = vectorize
        self.vmap_error: str | None = None  # why the per-step loop is used, if it is

    @property
    def inputs(self) -> tuple:
        """Per-step then shared inputs, in the order ``batched_with_params`` takes them."""
        return self.per_step + self.shared

    @property
    def vectorized(self) -> bool:
        return self.vectorize is not False and self.vmap_error is None

    # one step ---------------------------------------------------------------------------
    def single(self, l: int, z_flat: torch.Tensor, per_step: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        ps = self.per_step if per_step is None else per_step
        out = self.step(self.spec.unflatten(z_flat), *(p[l] for p in ps), *self.shared)
        return self.spec.flatten(out)

    # many steps -------------------------------------------------------------------------
    def batched_with_params(self, lo: int, hi: int) -> Callable:
        """``(Zprev, *per_step_slices, *shared) -> Znext`` for steps lo..hi-1 (for the backward VJP)."""
        spec, step, n_ps = self.spec, self.step, len(self.per_step)

        def one(z, *args):
            return spec.flatten(step(spec.unflatten(z), *args))

        in_dims = (0,) + (0,) * n_ps + (None,) * len(self.shared)
        looped = self._loop(one, n_ps)
        if not self.vectorized:
            return looped
        mapped = vmap(one, in_dims=in_dims)
        return self._with_fallback(mapped, looped)

    def replicated(self, copies: int) -> "Steps | None":
        """These steps on a batch of ``copies * B`` samples (for ``jacobians.jacobian_replicated``);
        None when the state has no batch dimension to grow, or an input seems to have one."""
        B = self.spec.batch_size
        if not self.spec.batch or any(p.dim() >= 2 and p.shape[1] == B > 1 for p in self.per_step) \
                or any(s.dim() >= 1 and s.shape[0] == B > 1 for s in self.shared):
            return None  # an input with the batch dimension (per-sample noise, conditioning) would not line up
        spec = dataclasses.replace(self.spec, shapes=tuple((copies * s[0], *s[1:]) for s in self.spec.shapes))
        return Steps(self.step, spec, self.per_step, self.shared, True if self.vectorized else False)

    def batched(self, lo: int, hi: int) -> Callable:
        """``Zprev -> Znext`` for steps lo..hi-1, with per-step and shared inputs closed over."""
        f = self.batched_with_params(lo, hi)
        per_step = tuple(p[lo:hi] for p in self.per_step)
        shared = self.shared
        return lambda Z: f(Z, *per_step, *shared)

    @staticmethod
    def _loop(one: Callable, n_ps: int) -> Callable:
        def looped(Z, *args):
            ps, sh = args[:n_ps], args[n_ps:]
            return torch.stack([one(Z[i], *(p[i] for p in ps), *sh) for i in range(Z.shape[0])])

        return looped

    def _with_fallback(self, mapped: Callable, looped: Callable) -> Callable:
        def call(*args):
            if self.vmap_error is None:
                try:
                    return mapped(*args)
                except Exception as exc:  # vmap could not batch an op in the user's step
                    if self.vectorize is True:
                        raise VectorizeError(
                            "Config(vectorize=True) but torch.func.vmap cannot batch this step: "
                            f"{type(exc).__name__}: {exc}. Use vectorize='auto' to fall back to a per-step loop."
                        ) from exc
                    self.vmap_error = f"{type(exc).__name__}: {exc}"
                    logger.warning("deeppcr: vmap cannot batch the step (%s); evaluating steps in a loop",
                                   self.vmap_error)
            return looped(*args)

        return call
