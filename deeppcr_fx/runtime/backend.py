"""Which backend runs a solve's iterations, and the cache of compiled iterations.

``Config.backend``:

- ``"eager"``: the reference runtime (``newton.triangular_newton`` on PyTorch ops); always correct.
- ``"inductor"``: the fused iteration (``runtime/fused.py``) traced once per step and input
  signature and compiled with ``torch.compile`` (inductor: C++ on CPU, Triton on CUDA). A step the
  tracer cannot follow (vmap cannot batch it, it reads tensors it closes over) runs eagerly, and
  ``SolveStats.backend_error`` says why.
- ``"auto"`` (default): compile time is user time, so compile a signature only once it has paid
  for itself: a signature runs eagerly until the eager time spent on it exceeds the predicted
  compile time (``COMPILE_PRIOR_S``), then compiles (the ski-rental rule: never more than about
  twice the better of "always eager" and "compile at once" in hindsight); a signature compiled
  before in this process is used at once.

Kernels are reused: per step object (a function, or the GraphModule behind a bound ``forward``;
held weakly) and signature (mode, shapes, dtypes, device, tolerances, non-tensor shared values), one
compiled function serves every later solve in the process; inductor's on-disk caches
(``/tmp/torchinductor_$USER``) serve later processes and identical graphs of other chains.
"""
from __future__ import annotations

import time
import warnings
import weakref
from typing import Any, Callable, Optional

import torch

# Predicted first-call seconds of a compiled iteration (trace + inductor) with a cold on-disk cache on
# this project's CPU: 11-13 s for a tanh MLP, L = 4096, w = 4 (benchmarks/results/peers_cpu.txt).
COMPILE_PRIOR_S = {"cpu": 12.0, "cuda": 20.0}
CHUNKED_COMPILE_FACTOR = 4.0  # runtime/fused.py's chunked scan: 52-73 s first call vs 9-40 s (load ~6)


class Entry:
    """One signature's compiled function (or why there is none) and the eager time spent on it."""

    def __init__(self) -> None:
        self.fn: Optional[Callable] = None
        self.error: Optional[str] = None  # why it could not be compiled (then it stays eager)
        self.eager_s = 0.0  # seconds of eager solves of this signature ("auto" compiles past the prior)
        self.compile_s: Optional[float] = None  # trace + first call of the compiled function


_CACHE: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def owner_of(step: Callable) -> Any:
    """What a step's compiled functions hang off: the object behind a bound method, else the callable."""
    return getattr(step, "__self__", None) or step


def entry(step: Callable, key: tuple) -> Optional[Entry]:
    """The cache entry of ``step`` for ``key`` (created on first use); None when neither the step nor
    the key can be cached (an unhashable non-tensor value, a step that takes no weak reference)."""
    try:
        hash(key)
        table = _CACHE.setdefault(owner_of(step), {})
    except TypeError:
        return None
    return table.setdefault((getattr(step, "__func__", None), key), Entry())


def use_compiled(backend: str, found: Optional[Entry], device: torch.device, chunked: bool = False) -> bool:
    """Whether this solve runs the compiled iteration (see the module docstring); ``chunked``: the
    compiled functions use the chunked scan, whose compile takes about CHUNKED_COMPILE_FACTOR times longer."""
    if backend == "eager" or found is None or found.error is not None:
        return False
    if backend == "inductor" or found.fn is not None:
        return True
    prior = COMPILE_PRIOR_S.get(device.type, COMPILE_PRIOR_S["cuda"])
    return found.eager_s >= prior * (CHUNKED_COMPILE_FACTOR if chunked else 1.0)


def compile_traced(fn: Callable, args: tuple, cuda_graphs: bool = False) -> Callable:
    """Trace ``fn(*args)`` to an aten graph (``make_fx``: torch.func transforms are traced through,
    Python control flow is resolved) and compile it with inductor (static shapes). A step that reads
    tensors it closes over is refused (they would be frozen into the graph): ``ValueError``."""
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(fn)(*args)
    constants = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    if constants:
        raise ValueError(f"the step reads tensors it closes over ({', '.join(map(str, constants[:3]))}); "
                         "pass them as per-step or shared inputs to compile the iteration")
    mode = "reduce-overhead" if cuda_graphs else None
    return torch.compile(gm, dynamic=False, fullgraph=True, mode=mode)


def build(found: Entry, fn: Callable, args: tuple, cuda_graphs: bool = False) -> Optional[Callable]:
    """Compile ``fn`` for ``found`` and run it once on ``args`` (the compile happens there); returns the
    first call's outputs, or None (with ``found.error`` set) when tracing or compiling fails."""
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():  # torch's own deprecation notices while compiling (torch.jit, _prims_common)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            compiled = compile_traced(fn, args, cuda_graphs)
            out = compiled(*args)
    except Exception as exc:  # noqa: BLE001 - any failure to trace or compile means: stay eager, say why
        found.error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"
        return None
    found.fn, found.compile_s = compiled, time.perf_counter() - t0
    return out


def tensor_signature(tensors) -> tuple:
    return tuple((tuple(t.shape), t.dtype, t.device.type) for t in tensors)
