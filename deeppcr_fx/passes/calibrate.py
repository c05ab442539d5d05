"""Per-device constants for the cost model: a short micro-benchmark, cached per process and device.

``calibrate(device)`` times a handful of primitives (``DeviceConstants.seconds`` says how long
that took) and returns a frozen ``DeviceConstants``. The result is kept in ``CACHE``, a
``CalibrationCache`` keyed by the device and torch's CPU thread count, so a process measures
each device once. The cache lives as long as the process (the constants describe the machine,
not a model); it is thread-safe (one lock: a device is measured once even when two threads
compile at the same time, and two measurements never run at once), and ``clear()`` (or
``calibrate(device, refresh=True)`` for one device) makes the next compilation measure again,
e.g. after the machine's load changed. What it times, and what the cost model uses it for:

=================  ================================================================  ========================
constant           primitive                                                         stands for
=================  ================================================================  ========================
``t_op``           the mean of ``torch.add``, ``torch.tanh`` and ``F.linear`` on a      one small eager op
                   few small tensors, called from Python
``t_module``       calling a module whose forward adds one of its Parameters, less   one module call per step
                   ``t_op`` (``Module.__call__`` and the attribute lookup)
``t_autograd``     forward with grad + ``backward()`` minus the no-grad forward of   one autograd node
                   32 steps ``z = tanh(z * p_l)`` (Mul, Tanh, AccumulateGrad each)   (AccumulateGrad included)
``t_stack``        ``torch.stack`` of 256 16-element tensors, per tensor             one stacked tensor
``bandwidth``      ``torch.add`` of two 2**20-element float32 tensors                bytes/s of streaming ops
``batched``        the step ``tanh(linear(z, W_l))`` with per-step n x n weights     batched step evaluation
                   over L steps and n samples, three ways: ``forward`` (``vmap``),   (``PCRSolve``'s work)
                   ``vjp`` (``torch.func.vjp`` of it and one pullback) and
                   ``jacobian`` (the pullback ``vmap``'d over the n basis vectors);
                   each as seconds per op (L = 8, n = 4, over its 2 ops) and seconds
                   per step FLOP ((T(L=1024) - T(L=8)) / (1016 * n * (2n² + n)))
                   at n = 4 and 16
``matmul[n]``      batched ``n x n @ n x n`` products, per product, n = 2 .. 64      the scan's matrix products
``matvec[n]``      batched ``n x n @ n x 1`` products, per product                   matrix-vector products
=================  ================================================================  ========================

The first calibration in a process also pays torch.func's one-time warm-up (the first
parallel solve would pay it anyway), so it takes longer than later ones. On CUDA every timed
block ends with a synchronisation, so the per-op times are the launch throughput of small
kernels. Each time is the minimum over a few repeats (the least disturbed run on a shared
machine). Nothing here changes global state besides the cache (thread count and RNG are left
as they are).
"""
from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch.func import vjp, vmap

SIZES = (2, 4, 8, 16, 32, 64)  # matrix sizes n timed for the scan's small products
BATCHED_SIZES = (4, 16)  # state widths n timed for the batched step primitives
BATCHED_KINDS = ("forward", "vjp", "jacobian")
_SMALL, _LARGE = 8, 1024  # steps L of the batched primitives: overhead, and throughput
# What measuring on a device the micro-benchmark cannot drive raises: RuntimeError (no such device,
# a backend error), NotImplementedError (an op the backend lacks), AssertionError (torch built
# without that backend, e.g. torch.cuda on a CPU-only build).
DEVICE_ERRORS = (RuntimeError, NotImplementedError, AssertionError)

logger = logging.getLogger(__name__)


def _loglog(table: tuple, x: float, power: float = 0.0) -> float:
    """Interpolate ``((size, value), ...)`` in log-log at ``x``; constant below the first size, and
    growing like ``size**power`` beyond the last."""
    sizes = [a for a, _ in table]
    x = max(float(x), sizes[0])
    if x >= sizes[-1]:
        return table[-1][1] * (x / sizes[-1]) ** power
    for (a, va), (b, vb) in zip(table, table[1:]):
        if x <= b:
            w = (math.log(x) - math.log(a)) / (math.log(b) - math.log(a))
            return math.exp(math.log(max(va, 1e-15)) * (1 - w) + math.log(max(vb, 1e-15)) * w)
    return table[-1][1]


@dataclass(frozen=True)
class DeviceConstants:
    """Measured unit costs of one device (seconds, bytes/s); see the module docstring."""

    device: str
    threads: int
    t_op: float
    t_module: float
    t_autograd: float
    t_stack: float
    bandwidth: float
    # kind -> (seconds per op, ((n, seconds per step FLOP), ...)) for kind in BATCHED_KINDS
    batched: dict
    matmul: tuple  # ((n, seconds per n x n @ n x n product), ...) for n in SIZES
    matvec: tuple  # ((n, seconds per n x n @ n x 1 product), ...)
    seconds: float = 0.0  # how long the calibration took

    def product_time(self, n: float, kind: str = "matmul") -> float:
        """Seconds per batched ``n x n`` product (``kind`` "matmul" or "matvec"), interpolated in log-log;
        beyond the largest size timed it grows like n^3 (matmul) or n^2 (matvec)."""
        return _loglog(self.matmul if kind == "matmul" else self.matvec, n, 3 if kind == "matmul" else 2)

    def op_time(self, kind: str) -> float:
        """Seconds per op of a batched step evaluation of ``kind`` ("forward", "vjp", "jacobian")."""
        return self.batched[kind][0]

    def flop_time(self, kind: str, n: float) -> float:
        """Seconds per step FLOP of a batched evaluation of ``kind`` at state width ``n`` (constant beyond
        the widths timed)."""
        return _loglog(self.batched[kind][1], n)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["matmul"], d["matvec"] = [list(p) for p in self.matmul], [list(p) for p in self.matvec]
        d["batched"] = {k: [t, [list(p) for p in per_flop]] for k, (t, per_flop) in self.batched.items()}
        return d


def _device(device: Union[str, torch.device, None]) -> torch.device:
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class CalibrationCache:
    """The constants measured so far, keyed by (device, CPU threads); thread-safe.

    One lock guards the table and the measurements: a thread asking for a device being measured
    waits for that measurement instead of starting its own (two at once would also disturb each
    other's timings). ``clear()`` forgets everything; nothing else is ever dropped.
    """

    def __init__(self, measure_fn: Optional[Callable[[torch.device], DeviceConstants]] = None) -> None:
        self._measure = measure_fn  # None: the module's ``measure`` (looked up per call, so tests can patch it)
        self._lock = threading.Lock()
        self._table: "dict[tuple, DeviceConstants]" = {}

    def get(self, device: torch.device, refresh: bool = False) -> DeviceConstants:
        """The constants of ``device`` at the current thread count, measured if not cached (or ``refresh``)."""
        key = (str(device), torch.get_num_threads())
        with self._lock:
            if refresh or key not in self._table:
                self._table[key] = (self._measure or measure)(device)
            return self._table[key]

    def snapshot(self) -> dict:
        """A copy of the table: (device, threads) -> ``DeviceConstants``."""
        with self._lock:
            return dict(self._table)

    def clear(self) -> None:
        """Forget every measurement: the next ``calibrate`` of each device measures again."""
        with self._lock:
            self._table.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._table)


CACHE = CalibrationCache()  # this process's measurements (see the module docstring)


def calibrate(device: Union[str, torch.device, None] = None, refresh: bool = False) -> DeviceConstants:
    """The constants of ``device`` (default CPU), measured once per process, device and CPU thread count.

    Arguments:
        device: where to measure; a CUDA device without an index means the current one.
        refresh: measure again even if ``CACHE`` holds this device's constants.

    Returns:
        The ``DeviceConstants``, from ``CACHE`` when they are there.
    """
    return CACHE.get(_device(device), refresh)


def cached() -> dict:
    """The constants measured so far in this process, keyed by (device, threads)."""
    return CACHE.snapshot()


def clear() -> None:
    """Forget every measurement of this process (``CACHE.clear()``): later compilations measure again."""
    CACHE.clear()


def constants_for(device_type: str, index: Optional[int] = None) -> DeviceConstants:
    """``calibrate`` for a device as the compiler sees it; the CPU's constants where the device cannot
    run the micro-benchmark (one of ``DEVICE_ERRORS``; logged)."""
    try:
        return calibrate(torch.device(device_type, index) if index is not None else device_type)
    except DEVICE_ERRORS as exc:  # an accelerator this micro-benchmark cannot drive: the CPU's, conservatively
        logger.warning("deeppcr: cannot calibrate %s (%s: %s); the cost model uses the CPU's constants",
                       device_type if index is None else f"{device_type}:{index}", type(exc).__name__, exc)
        return calibrate("cpu")


def _per_call(fn: Callable[[], object], number: int, sync: Callable[[], None], repeats: int = 5) -> float:
    """The least disturbed (minimum) over ``repeats`` of the time per call of ``fn`` run ``number`` times,
    after one warm-up call."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        sync()
        times.append((time.perf_counter() - t0) / number)
    return min(times)


class _Probe(torch.nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)

    def forward(self, x):
        return torch.add(x, self.weight)


def _step(z, w):
    return torch.tanh(F.linear(z, w))


def _batched_primitives(n: int, steps: int, rand, device, sync) -> dict:
    """Seconds per call of the three batched evaluations of ``_step`` over ``steps`` steps, n samples."""
    Z, W = rand(steps, n, n), rand(steps, n, n) / n ** 0.5
    g = vmap(_step)
    ones = torch.ones_like(Z)
    basis = torch.eye(n, device=device).view(n, 1, 1, n).expand(n, *Z.shape)

    def forward():
        return g(Z, W)

    def vjp_once():
        _, pullback = vjp(lambda z: g(z, W), Z)
        return pullback(ones)

    def jacobian():
        _, pullback = vjp(lambda z: g(z, W), Z)
        return vmap(lambda c: pullback(c)[0])(basis)

    number = 5 if steps == _SMALL else 1
    repeats = 5
    return {"forward": _per_call(forward, number, sync, repeats), "vjp": _per_call(vjp_once, number, sync, repeats),
            "jacobian": _per_call(jacobian, number, sync, repeats)}


def measure(device: torch.device) -> DeviceConstants:
    """Run the micro-benchmark on ``device`` (no caching; use ``calibrate``), whatever the caller's grad mode."""
    with torch.inference_mode(False), torch.enable_grad():
        return _measure(device)


def _measure(device: torch.device) -> DeviceConstants:
    start = time.perf_counter()
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)  # the global RNG is left alone

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    with torch.no_grad():
        a, b, w, x1 = rand(64), rand(64), rand(8, 8), rand(1, 8)
        t_add = _per_call(lambda: torch.add(a, b), 200, sync)
        t_op = (t_add + _per_call(lambda: torch.tanh(a), 200, sync) + _per_call(lambda: F.linear(x1, w), 200, sync)) / 3
        probe = _Probe(b)
        t_module = max(_per_call(lambda: probe(a), 200, sync) - t_add, 0.0)
        parts = [rand(16) for _ in range(256)]
        t_stack = _per_call(lambda: torch.stack(parts), 20, sync) / len(parts)
        x, y = rand(1 << 20), rand(1 << 20)
        bandwidth = 3 * 4 * x.numel() / _per_call(lambda: torch.add(x, y), 5, sync)
        matmul, matvec = [], []
        for n in SIZES:
            batch = max(64, min(4096, (1 << 21) // n ** 3))
            A, M, v = rand(batch, n, n), rand(batch, n, n), rand(batch, n, 1)
            matmul.append((n, _per_call(lambda: torch.bmm(A, M), 3, sync, repeats=3) / batch))
            matvec.append((n, _per_call(lambda: torch.bmm(A, v), 3, sync, repeats=3) / batch))

    small = _batched_primitives(BATCHED_SIZES[0], _SMALL, rand, device, sync)
    per_flop: dict = {kind: [] for kind in BATCHED_KINDS}
    for n in BATCHED_SIZES:
        low = small if n == BATCHED_SIZES[0] else _batched_primitives(n, _SMALL, rand, device, sync)
        high = _batched_primitives(n, _LARGE, rand, device, sync)
        flops = (_LARGE - _SMALL) * n * (2 * n * n + n)  # step FLOPs added: n samples of linear + tanh
        for kind in BATCHED_KINDS:
            per_flop[kind].append((n, max(high[kind] - low[kind], 1e-9) / flops))
    batched = {kind: (small[kind] / 2, tuple(per_flop[kind])) for kind in BATCHED_KINDS}

    chain = 32
    p = [rand(4).requires_grad_() for _ in range(chain)]
    z0 = rand(4)

    def forward():
        z = z0
        for w in p:
            z = torch.tanh(z * w)
        return z

    def train():
        forward().sum().backward()

    with torch.no_grad():
        t_nograd = _per_call(forward, 5, sync)
    t_train = _per_call(train, 5, sync)
    t_autograd = max(t_train - t_nograd, 0.0) / (3 * chain)
    return DeviceConstants(device=str(device), threads=torch.get_num_threads(), t_op=t_op, t_module=t_module,
                           t_autograd=t_autograd, t_stack=t_stack, bandwidth=bandwidth, batched=batched,
                           matmul=tuple(matmul), matvec=tuple(matvec), seconds=time.perf_counter() - start)
