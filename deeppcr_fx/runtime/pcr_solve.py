"""``PCRSolve``: the module a rewritten chain becomes.

It holds the step template (a small GraphModule of one segment, without parameters:
weights arrive as stacked per-step inputs built from the user's Parameters at call
time) and calls ``deeppcr_fx.solve``. The last call's ``SolveStats`` is kept.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from ..config import Config
from .solve import solve
from .stats import SolveStats


class PCRSolve(torch.nn.Module):
    """``forward(x0, *per_step, *shared) -> states (L, *x0.shape)`` for a chain of L steps."""

    def __init__(self, step: fx.GraphModule, length: int, n_per_step: int, config: Config,
                 covers: tuple = (), period: int = 1) -> None:
        super().__init__()
        self.step = step
        self.length = length
        self.n_per_step = n_per_step
        self.config = config
        self.covers = tuple(covers)  # names of the original modules (or nodes) the chain replaces
        self.period = period
        self.last_stats: Optional[SolveStats] = None

    def forward(self, x0: torch.Tensor, *inputs):
        per_step, shared = inputs[:self.n_per_step], inputs[self.n_per_step:]
        res = solve(self.step, x0, per_step=per_step, shared=shared, config=self.config, length=self.length)
        self.last_stats = res.stats
        return res.states

    @property
    def mode(self) -> str:
        """The Jacobian mode of the last solve, or the requested one before the first call."""
        return self.last_stats.jacobian if self.last_stats is not None else self.config.jacobian

    def extra_repr(self) -> str:
        covers = ", ".join(self.covers[:3]) + (f", ... ({len(self.covers)} in all)" if len(self.covers) > 3 else "")
        return f"L={self.length}, period={self.period}, mode={self.mode}, per_step={self.n_per_step}, covers=[{covers}]"
