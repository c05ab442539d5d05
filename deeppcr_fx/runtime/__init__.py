"""The parallel chain solver: Newton iterations with PCR linear solves, and exact parallel gradients."""
from .solve import SolveResult, solve
from .stats import PassStats, SolveStats

__all__ = ["FinishCause", "PassStats", "SolveResult", "SolveStats", "solve"]
