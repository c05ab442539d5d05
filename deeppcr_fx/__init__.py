"""deeppcr_fx: run deep and step-by-step PyTorch computations in parallel along their depth.

    import deeppcr_fx as deeppcr
    res = deeppcr.solve(step, x0, per_step=(W, b))     # the runtime, no FX needed
    compiled = deeppcr.compile(model); compiled(x)       # chains rewritten into parallel PCRSolve nodes
    deeppcr.compile(pipe)                                # a diffusers pipeline: its sampling loop, one solve
    deeppcr.compile(model, group=dist.group.WORLD)       # the chain split by depth over ranks
    print(compiled.report); compiled.stats()             # what it found and did; how the solver converged
    deeppcr.explain(model, (x,))                         # the CompileReport only
    deeppcr.draw(compiled, "graph.svg"); deeppcr.plot_convergence(compiled.stats(), "conv.png")  # optional extras
"""
from .api import compile, explain
from .config import Config
from .inspect import ChainRecord, ChainStats, CompileReport, InputRecord, draw, plot_convergence
from .layer_parallel import LayerParallelModule
from .pipelines import CompiledPipeline
from .results import (CompileError, DeepPCRError, DistributedSolveError, FinishCause, InvalidInput,
                      MissingDependency, Reason, Refusal)
from .runtime import PassStats, SolveResult, SolveStats, solve
from .runtime.distributed_model import LayerParallel
from .runtime.pcr_solve import PCRSolve

__all__ = [
    # compile and inspect
    "compile", "explain", "CompileReport", "ChainRecord", "InputRecord", "Reason", "Refusal",
    "ChainStats", "PCRSolve", "draw", "plot_convergence", "MissingDependency",
    "CompiledPipeline",  # deeppcr.compile(pipe) for a diffusers pipeline
    # the runtime
    "solve", "SolveResult", "SolveStats", "PassStats", "FinishCause",
    # layer-parallel (one chain split by depth over torch.distributed ranks)
    "LayerParallel", "LayerParallelModule", "DistributedSolveError",
    # errors (every one derives from DeepPCRError)
    "DeepPCRError", "CompileError", "InvalidInput",
    # options
    "Config",
]
__version__ = "0.1.0"
