"""Inspection: compile reports as data (``report``), rendered separately (``render``); graph drawing
(``drawing``), solver telemetry (``telemetry``) and its plot (``plotting``)."""
from .drawing import draw
from .plotting import plot_convergence
from .report import ChainRecord, CompileReport, InputRecord
from .telemetry import ChainStats

__all__ = ["ChainRecord", "ChainStats", "CompileReport", "InputRecord", "draw", "plot_convergence"]
