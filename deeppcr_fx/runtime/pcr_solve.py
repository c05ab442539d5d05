"""``PCRSolve``: the module a rewritten chain becomes.

It holds the step template (a small GraphModule of one segment, without parameters:
weights arrive as stacked per-step inputs built from the user's Parameters at call
time) and calls ``deeppcr_fx.solve``. With ``Config.warm_start`` each solve starts from the
previous call's solution (after one that never met it, the next ``COLD_AFTER_MISS`` calls start cold). The last call's ``SolveStats`` is kept in ``last_stats``; with
``Config.record_stats`` every solve's stats are also kept in ``history`` (the latest
``MAX_RECORDED_SOLVES``; ``reset_stats()`` clears them). With ``Config.progress`` each solve
shows a progress bar (tqdm) fed by the Newton loop's ``on_iteration`` hook.

What the module remembers between calls, all of it its own (it lives as long as the module):
the warm start's guess (``reset_warm_start()``), the stats (``reset_stats()``), and whether the
step accepts a replicated batch for its Jacobians (``replication``, a
``jacobians.ReplicationMemo``; ``replication.reset()`` forgets it).
"""
from __future__ import annotations

from collections import deque
from typing import Optional

import torch
import torch.fx as fx

from ..config import Config
from .jacobians import ReplicationMemo
from .solve import solve
from .stats import SolveStats

MAX_RECORDED_SOLVES = 1000  # per chain: a training loop keeps only its latest solves' telemetry
# A warm start keeps the last solution (L * B * n elements) alive between calls; larger ones are dropped.
WARM_START_MAX_ELEMENTS = 1 << 25
# After a warm start whose sequential prefix never met the previous solution (it cost L / 16 sequential
# steps for nothing), this many calls start cold before a warm start is tried again.
COLD_AFTER_MISS = 8
COSTLY_PREFIX = 8  # a missed prefix shorter than this costs less than it may save: keep warm starting


class PCRSolve(torch.nn.Module):
    """``forward(x0, *per_step, *shared) -> states (L, *x0.shape)`` for a chain of L steps.

    Arguments:
        step: the step template, ``step(z, *per_step_slices, *shared) -> z_next`` (a GraphModule
            of one segment, without parameters of its own).
        length: L, the number of steps.
        n_per_step: how many of ``forward``'s inputs after x0 are per-step (leading dimension L);
            the rest are shared by every step.
        config: the ``Config`` every solve runs with.
        covers: names of the original modules (or nodes) the chain replaces (for the report).
        period: graph segments per step (for the report).

    ``forward`` returns the states z_1..z_L stacked, differentiable w.r.t. x0 and the inputs
    (``SolveResult.states`` of ``deeppcr_fx.solve``).
    """

    def __init__(self, step: fx.GraphModule, length: int, n_per_step: int, config: Config,
                 covers: tuple = (), period: int = 1) -> None:
        super().__init__()
        self.step = step
        self.length = length
        self.n_per_step = n_per_step
        self.config = config
        self.covers = tuple(covers)  # names of the original modules (or nodes) the chain replaces
        self.period = period
        self.planned_mode: Optional[str] = None  # the compiler's resolution of Config.jacobian for this state
        self.last_stats: Optional[SolveStats] = None
        self.history: deque = deque(maxlen=MAX_RECORDED_SOLVES)
        self._guess: Optional[torch.Tensor] = None  # the last solution, where the next solve starts
        self._cold_calls = 0  # calls left to start cold after a warm start that did not pay
        self.replication = ReplicationMemo()  # whether ``step`` accepts a replicated batch

    def forward(self, x0: torch.Tensor, *inputs):
        per_step, shared = inputs[:self.n_per_step], inputs[self.n_per_step:]
        bar = None
        if self.config.progress:
            from .progress import SolveProgress  # tqdm is optional

            bar = SolveProgress(self.length, self.describe())
        warm = self.config.warm_start and self._cold_calls == 0
        self._cold_calls = max(0, self._cold_calls - 1)
        try:
            res = solve(self.step, x0, per_step=per_step, shared=shared, config=self.config, length=self.length,
                        on_iteration=bar, initial_guess=self._guess if warm else None, replication=self.replication)
        finally:
            if bar is not None:
                bar.close()
        forward = res.stats.forward
        if forward.guess_met is False and forward.prefix >= COSTLY_PREFIX:  # trajectories that never meet (a
            self._cold_calls = COLD_AFTER_MISS  # chain driven by fresh per-step inputs): the next calls start cold
        keep = self.config.warm_start and res.solution is not None and res.solution.numel() <= WARM_START_MAX_ELEMENTS
        self._guess = res.solution if keep else None
        self.last_stats = res.stats
        if self.config.record_stats:
            self.history.append(res.stats)
        return res.states

    def reset_stats(self) -> None:
        self.last_stats = None
        self.history.clear()

    def reset_warm_start(self) -> None:
        """Forget the previous solution: the next solve starts cold (from the input repeated)."""
        self._guess = None
        self._cold_calls = 0

    @property
    def mode(self) -> str:
        """The Jacobian mode of the last solve, or the planned (else requested) one before the first call."""
        if self.last_stats is not None:
            return self.last_stats.jacobian
        return self.planned_mode or self.config.jacobian

    def describe(self) -> str:
        """The original modules the chain covers, e.g. ``blocks.0 .. blocks.7``."""
        if not self.covers:
            return f"chain of {self.length}"
        return self.covers[0] if len(self.covers) == 1 else f"{self.covers[0]} .. {self.covers[-1]}"

    def extra_repr(self) -> str:
        covers = ", ".join(self.covers[:3]) + (f", ... ({len(self.covers)} in all)" if len(self.covers) > 3 else "")
        return f"L={self.length}, period={self.period}, mode={self.mode}, per_step={self.n_per_step}, covers=[{covers}]"
