"""deeppcr_fx: run deep and step-by-step PyTorch computations in parallel along their depth.

    import deeppcr_fx as deeppcr
    res = deeppcr.solve(step, x0, per_step=(W, b))     # the runtime, no FX needed
"""
from .config import Config
from .runtime import FinishCause, PassStats, SolveResult, SolveStats, solve

__all__ = ["Config", "FinishCause", "PassStats", "SolveResult", "SolveStats", "solve"]
__version__ = "0.1.0"

from .api import CompileError, compile, explain  # noqa: E402
from .inspect import ChainRecord, CompileReport  # noqa: E402
from .passes.validate import Reason  # noqa: E402
from .runtime.pcr_solve import PCRSolve  # noqa: E402

__all__ += ["ChainRecord", "CompileError", "CompileReport", "PCRSolve", "Reason", "compile", "explain"]
