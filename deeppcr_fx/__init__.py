"""deeppcr_fx: run deep and step-by-step PyTorch computations in parallel along their depth.

    import deeppcr_fx as deeppcr
    res = deeppcr.solve(step, x0, per_step=(W, b))     # the runtime, no FX needed
    compiled = deeppcr.compile(model); compiled(x)       # chains rewritten into parallel PCRSolve nodes
    print(compiled.report); compiled.stats()             # what it found and did; how the solver converged
    deeppcr.explain(model, (x,))                         # the CompileReport only
    deeppcr.draw(compiled, "graph.svg"); deeppcr.plot_convergence(compiled.stats(), "conv.png")  # optional extras
"""
from .config import Config
from .runtime import FinishCause, PassStats, SolveResult, SolveStats, solve

__all__ = ["Config", "FinishCause", "PassStats", "SolveResult", "SolveStats", "solve"]
__version__ = "0.1.0"

from .api import CompileError, compile, explain  # noqa: E402
from .inspect import (ChainRecord, ChainStats, CompileReport, InputRecord, MissingDependency, draw,  # noqa: E402
                      plot_convergence)
from .passes.validate import Reason  # noqa: E402
from .runtime.pcr_solve import PCRSolve  # noqa: E402

__all__ += ["ChainRecord", "ChainStats", "CompileError", "CompileReport", "InputRecord", "MissingDependency", "PCRSolve",
            "Reason", "compile", "draw", "explain", "plot_convergence"]
