"""Inspection: compile reports as data (``report``), rendered separately (``render``); graph drawing
(``draw``), solver telemetry (``telemetry``) and its plot (``plot``), a solve progress bar (``progress``)."""
from .draw import draw
from .optional import MissingDependency
from .plot import plot_convergence
from .report import ChainRecord, CompileReport, InputRecord
from .telemetry import ChainStats

__all__ = ["ChainRecord", "ChainStats", "CompileReport", "InputRecord", "MissingDependency", "draw",
           "plot_convergence"]
