"""What goes into ``deeppcr.solve`` and what comes out, shared by the one-process and the
layer-parallel solve: the result type, the checks on per-step inputs, binding non-tensor
shared values, and the incoming state gradients in the solver's layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ..results import InvalidInput
from .state import StateSpec
from .stats import SolveStats


@dataclass
class SolveResult:
    """What ``solve`` returns.

    Attributes:
        states: z_1..z_L stacked, shape (L, *x0.shape) (a tuple of such for tuple states);
            differentiable w.r.t. x0, the per-step and the shared tensors.
        stats: the ``SolveStats`` of this solve (its ``backward`` is filled when a backward pass runs).
        solution: the same states in the solver's flat layout (L, B, n), detached: pass it as
            ``initial_guess`` to a later solve of the same shapes (a warm start).
    """

    states: Any
    stats: SolveStats
    solution: Optional[torch.Tensor] = None


def stack_grads(spec: StateSpec, grads, U: torch.Tensor) -> torch.Tensor:
    """Incoming state gradients as (L, B, n); None (unused outputs) counts as zero."""
    parts = []
    for i, g in enumerate(grads):
        if g is None:
            g = torch.zeros((U.shape[0], *spec.shapes[i]), dtype=U.dtype, device=U.device)
        parts.append(g)
    return spec.flatten(tuple(parts) if spec.is_tuple else parts[0], lead=1)


def check_length(per_step: tuple, length: Optional[int]) -> int:
    for i, p in enumerate(per_step):
        if not isinstance(p, torch.Tensor):
            raise InvalidInput(f"per_step[{i}] must be a tensor with a leading dimension L, got {type(p).__name__}.")
        if p.dim() == 0:
            raise InvalidInput(f"per_step[{i}] is a 0-d tensor; per-step tensors need a leading dimension L.")
    lengths = [p.shape[0] for p in per_step] + ([] if length is None else [length])
    if not lengths:
        raise InvalidInput("solve needs the chain length: pass per-step tensors with a leading dimension L, "
                         "or length=L for a chain whose steps share all their inputs.")
    if len(set(lengths)) != 1:
        raise InvalidInput(f"per-step tensors (and length=) must agree on the chain length L; got {lengths}.")
    if lengths[0] < 1:
        raise InvalidInput(f"the chain is empty (L = {lengths[0]}); L must be >= 1.")
    return lengths[0]


def bind_constants(step: Callable, n_per_step: int, shared: tuple) -> Callable:
    """Close over non-tensor shared values so only tensors travel through vmap and autograd."""
    if all(isinstance(s, torch.Tensor) for s in shared):
        return step
    tensor_pos = [i for i, s in enumerate(shared) if isinstance(s, torch.Tensor)]

    def bound(z, *args):
        per, tensors = args[:n_per_step], args[n_per_step:]
        values = list(shared)
        for i, t in zip(tensor_pos, tensors):
            values[i] = t
        return step(z, *per, *values)

    return bound
