"""``Config(flush_denormals=True)``: run a solve's iterations with float denormals flushed to zero.

Products of many Jacobians (the scan's PCR rounds, a gain-1 tanh MLP's chain) can underflow to float32
denormals, which CPUs compute several times slower (one compiled iteration, L = 4096, w = 4: 4.8-5.4 ms
flushed vs 17.6-28.3 ms not, benchmarks/results/peers_cpu_fused_direct.txt; not reproduced on the same
weights in peers_cpu_fused_perf.txt, and no difference on peers.py's problems). XLA on CPU flushes by
default. ``torch.set_flush_denormal`` sets the calling thread's floating-point control flags and has
no getter, so ``flushed`` reads the current setting with a probe (a denormal times one is zero only
when flushing) and restores exactly that afterwards.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def flushing() -> bool:
    """Whether this thread flushes float32 denormals to zero now (``torch.set_flush_denormal``)."""
    return bool((torch.tensor([1e-39]) * 1 == 0).item())


@contextlib.contextmanager
def flushed(enabled: bool) -> Iterator[None]:
    """Flush denormals inside the block when ``enabled``; the setting before it is restored after it
    (also on an exception). Does nothing when not enabled, already flushing, or unsupported on this CPU."""
    if not enabled or flushing() or not torch.set_flush_denormal(True):
        yield
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
