"""Inspection: compile reports as data (``report``), rendered separately (``render``); graph drawing
(``drawing``), solver telemetry (``telemetry``) and its plot (``plotting``), a solve progress bar (``progress``)."""
from .drawing import draw
from .optional import MissingDependency
from .plotting import plot_convergence
from .report import ChainRecord, CompileReport, InputRecord
from .telemetry import ChainStats

__all__ = ["ChainRecord", "ChainStats", "CompileReport", "InputRecord", "MissingDependency", "draw",
           "plot_convergence"]
