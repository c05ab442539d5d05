"""Solver telemetry per compiled chain, as data: ``CompiledModule.stats()`` returns ``ChainStats``.

Every solve of a rewritten chain leaves a ``SolveStats`` (iterations, the worst scaled residual
after each iteration, the window start before each iteration, and whether and why the last
steps were finished sequentially). They are kept per ``PCRSolve`` while ``Config.record_stats``
is on (the default); ``CompiledModule.reset_stats()`` clears them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(repr=False)  # a chain may cover thousands of modules: the repr summarises
class ChainStats:
    """The recorded solves of one rewritten chain (oldest first)."""

    chain: int  # ChainRecord.index in the report of its specialisation
    submodule: str  # the PCRSolve's name in the compiled graph
    covers: tuple  # the original modules the chain replaces
    length: int
    signature: str  # the input signature of the specialisation
    solves: list = field(default_factory=list)  # SolveStats, one per call

    @property
    def label(self) -> str:
        span = self.covers[0] if len(self.covers) == 1 else \
            f"{self.covers[0]} .. {self.covers[-1]}" if self.covers else self.submodule
        return f"#{self.chain} {span} (L={self.length})"

    @property
    def iterations(self) -> list:
        return [s.iterations for s in self.solves]

    @property
    def residuals(self) -> list:
        """Per solve: the worst scaled residual after each Newton iteration (<= 1 is converged)."""
        return [list(s.residuals) for s in self.solves]

    @property
    def sequential_finishes(self) -> list:
        """Per solve: ``(first step finished sequentially, FinishCause)`` or ``None``."""
        return [None if s.sequential_finish is None else (s.forward.sequential_from, s.sequential_finish)
                for s in self.solves]

    @property
    def last(self) -> Optional[object]:
        return self.solves[-1] if self.solves else None

    def to_dict(self) -> dict:
        return {"chain": self.chain, "submodule": self.submodule, "covers": list(self.covers),
                "length": self.length, "signature": self.signature, "solves": [s.to_dict() for s in self.solves]}

    def __str__(self) -> str:
        finishes = sum(f is not None for f in self.sequential_finishes)
        return (f"{self.label}: {len(self.solves)} solves, iterations {self.iterations}"
                + (f", {finishes} sequential finishes" if finishes else ""))

    def __repr__(self) -> str:
        return f"ChainStats({self})"


def collect(graph_module, report) -> list:
    """``ChainStats`` for every rewritten chain of one specialisation."""
    out = []
    if graph_module is None or report is None:
        return out
    for rec in report.rewritten:
        try:
            solve = graph_module.get_submodule(rec.submodule)
        except AttributeError:  # a record of another TorchDynamo graph
            continue
        out.append(ChainStats(rec.index, rec.submodule, tuple(rec.covers), rec.length, report.signature,
                              list(solve.history)))
    return out
