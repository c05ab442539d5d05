"""Which backend runs a solve's iterations, and the cache of compiled iterations.

``Config.backend``:

- ``"eager"``: the reference runtime (``newton.triangular_newton`` on PyTorch ops); always correct.
- ``"inductor"``: the fused iteration (``runtime/fused.py``) traced once per step and input
  signature and compiled by inductor (C++ on CPU, Triton on CUDA), called directly: no TorchDynamo
  or AOT autograd wrapper per call (``compile_traced``). A step the tracer cannot follow (vmap
  cannot batch it, it reads tensors it closes over) runs eagerly, and ``SolveStats.backend_error``
  says why.
- ``"auto"`` (default): compile time is user time, so compile a signature only once it has paid
  for itself: a signature runs eagerly until the eager time spent on it exceeds the predicted
  compile time (``COMPILE_PRIOR_S``), then compiles (the ski-rental rule: never more than about
  twice the better of "always eager" and "compile at once" in hindsight); a signature compiled
  before in this process is used at once.

Kernels are reused: per step object (a function, or the GraphModule behind a bound ``forward``;
held weakly) and signature (mode, shapes, dtypes, device, tolerances, non-tensor shared values), one
compiled function serves every later solve in the process; inductor's on-disk caches
(``/tmp/torchinductor_$USER``) serve later processes and identical graphs of other chains, and
inductor's per-process C++ vector-ISA probe is answered from a small file after the first process
(``inductor_setup``).
"""
from __future__ import annotations

import time
import warnings
import weakref
from typing import Any, Callable, Optional

import torch

# Predicted first-call seconds of a compiled iteration (trace + inductor) with a cold on-disk cache on
# this project's CPU: 7.3-10.9 CPU seconds (7.4-13.1 s wall at load 2.1-4.2) for a tanh MLP, L = 4096,
# w = 4, with inductor's ISA probe remembered (inductor_setup; it was ~2 s more per process, 11-13 s in
# peers_cpu.txt); benchmarks/results/compile_time_cpu.txt.
COMPILE_PRIOR_S = {"cpu": 10.0, "cuda": 20.0}
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


def entry(step: Callable, key: tuple, create: bool = True) -> Optional[Entry]:
    """The cache entry of ``step`` for ``key`` (created on first use unless ``create`` is False); None when
    there is none or neither the step nor the key can be cached (an unhashable non-tensor value, a step
    that takes no weak reference)."""
    try:
        hash(key)
        table = _CACHE.setdefault(owner_of(step), {}) if create else _CACHE.get(owner_of(step), {})
    except TypeError:
        return None
    full_key = (getattr(step, "__func__", None), key)
    return table.setdefault(full_key, Entry()) if create else table.get(full_key)


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
    """Trace ``fn(*args)`` to a functional aten graph with inductor's decompositions (``make_fx``:
    torch.func transforms are traced through, Python control flow is resolved) and compile it with
    inductor directly (``compile_fx_inner``; static shapes and strides): no TorchDynamo and no AOT
    autograd, whose guards and runtime wrappers cost more per call than a small iteration's kernels
    (the graph needs no autograd: its gradients are explicit). Returns ``call(*args)`` with ``fn``'s
    outputs. ``cuda_graphs``: the graph is replayed as a CUDA graph (inductor's cudagraph trees) when
    its inputs are on CUDA; ignored on CPU. A step that reads tensors it closes over is refused (they
    would be frozen into the graph): ``ValueError``."""
    return DirectCall(fn, args, cuda_graphs and any(isinstance(a, torch.Tensor) and a.is_cuda for a in args))


def trace(fn: Callable, args: tuple) -> torch.fx.GraphModule:
    """``fn`` as the functional aten graph inductor lowers (what AOT autograd would hand it)."""
    from torch._inductor.decomposition import select_decomp_table
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    # make_fx records each node's value as a fake tensor; with real inputs it makes a new FakeTensorMode per
    # node for that (each takes a Python stack trace: about a third of the trace's CPU time) unless the
    # tracing context holds one: give it the one extract_val would make (compile_time_cpu.txt)
    context = torch._guards.TracingContext(FakeTensorMode(allow_fallback_kernels=True))
    with torch._guards.tracing(context):
        gm = make_fx(torch.func.functionalize(fn, remove="mutations"),
                     decomposition_table=select_decomp_table())(*args)
    constants = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    if constants:
        raise ValueError(f"the step reads tensors it closes over ({', '.join(map(str, constants[:3]))}); "
                         "pass them as per-step or shared inputs to compile the iteration")
    return gm


# Compiled variants per function for other input strides (inductor's code asserts the strides it was
# compiled for); past this many, calls with new strides run the Python function.
MAX_STRIDE_VARIANTS = 4


class DirectCall:
    """A traced function compiled by inductor, called without wrappers: ``self(*args)`` puts the
    arguments in a list (inductor's boxed convention; the generated ``call`` empties it) and returns
    the outputs as ``fn`` does (a tuple, or one tensor). Inputs with other strides than the first
    call's compile a variant (inductor's code raises ``AssertionError`` before any kernel runs). With
    ``cuda_graphs`` the outputs are copies: a replay overwrites the graph's own output buffers."""

    def __init__(self, fn: Callable, args: tuple, cuda_graphs: bool) -> None:
        self.fn, self.cuda_graphs = fn, cuda_graphs
        _setup_inductor()
        gm = trace(fn, args)
        self.single = _flat_outputs(gm)
        self.strides = _strides(args)
        self.call = self._compile(gm, args)
        self.variants = {self.strides: self.call}

    def _compile(self, gm: torch.fx.GraphModule, args: tuple) -> Callable:
        from torch._inductor.compile_fx import compile_fx_inner
        from torch._inductor.utils import BoxedBool
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        # What TorchDynamo would hand inductor: fake example inputs (real ones are hashed by value into
        # the on-disk FX graph cache key, so no later process would hit it) and a tracing context with
        # a shape environment (without one inductor bypasses that cache).
        fake_mode = FakeTensorMode(shape_env=ShapeEnv())
        fakes = [fake_mode.from_tensor(a, static_shapes=True) if isinstance(a, torch.Tensor) else a for a in args]
        with torch._guards.tracing(torch._guards.TracingContext(fake_mode)):
            compiled = compile_fx_inner(gm, fakes, is_inference=True, cudagraphs=BoxedBool(self.cuda_graphs))
        # its current_callable: the generated ``call`` (CUDA: behind inductor's cudagraph trees; inputs
        # that are not 16-byte aligned are copied first); CompiledFxGraph.__call__ adds profiler hooks only
        call = compiled.current_callable
        if self.cuda_graphs:
            return lambda boxed: tuple(o.clone() for o in call(boxed))
        return call

    def __call__(self, *args):
        if torch.is_grad_enabled():  # inductor's kernels write into out= buffers: no autograd here
            with torch.no_grad():
                return self(*args)
        try:
            out = self.call(list(args))
        except AssertionError:
            key = _strides(args)
            if key == self.strides:  # not a stride mismatch
                raise
            out = self._variant(key, args)(list(args))
        return out[0] if self.single else out

    def _variant(self, key: tuple, args: tuple) -> Callable:
        call = self.variants.get(key)
        if call is None:
            if len(self.variants) >= MAX_STRIDE_VARIANTS:
                return lambda boxed: (self.fn(*boxed),) if self.single else self.fn(*boxed)
            gm = trace(self.fn, args)
            _flat_outputs(gm)
            call = self.variants[key] = self._compile(gm, args)
        return call


def _setup_inductor() -> None:
    """Inductor's C++ vector-ISA probe remembered across processes (``inductor_setup``); never fails a compile."""
    from . import inductor_setup

    try:
        inductor_setup.install()
    except Exception:  # noqa: BLE001 - inductor probes as it would without us
        pass


def _flat_outputs(gm: torch.fx.GraphModule) -> bool:
    """Make ``gm`` return a tuple (inductor compiles only those); True when ``fn`` returned one tensor."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    if isinstance(out.args[0], (tuple, list)):
        if any(not isinstance(a, torch.fx.Node) for a in out.args[0]):
            raise ValueError("the traced function returns non-tensor values")
        return False
    out.args = ((out.args[0],),)
    gm.graph.lint()
    gm.recompile()
    return True


def _strides(args: tuple) -> tuple:
    return tuple(a.stride() if isinstance(a, torch.Tensor) else None for a in args)


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
