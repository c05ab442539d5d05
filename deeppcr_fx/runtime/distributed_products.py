"""Chunk products for a layer-parallel rank that applies its input after the exchange.

The compiled adjoint's second rank (in logical order) scans its rows for a zero input before the
exchange (``scan_products``) and, once the gathered maps give its input x, adds what x contributes to
every row, ``Phi_l x`` with ``Phi_l = A_l ... A_0`` (``propagate``). The chunked scan
(``fused_scan.chunked_with_products``) forms the running products inside its chunks anyway; their
cumulative products across chunks give Phi at O(m) work. The compiled forward keeps none (its ranks
scan after the exchange, ``distributed_fused``).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import fused_scan
from .fused import FUSED_CHUNK, fused_chunk
from .modes import Mode

# The rank that keeps chunk products (``scan_products``: the adjoint's second rank in logical order) forms
# Phi_l = A_l ... A_0 for every row. By PCR (``fused_chunk`` = 0 below 8192 rows) that is log2(m) full-size
# compositions: L = 8192 (m = 4096), w = 4, a compiled call that forms them took 3.9 ms CPU vs 1.2 ms with
# the chunked scan (benchmarks/results/layer_parallel_cpu_overhead.txt). So that rank uses the chunked scan
# from this length on (shorter slices keep PCR: the chunked scan's compile takes several times longer).
PRODUCTS_CHUNK_MIN_LENGTH = 2048


def rank_chunk(m: int, device: torch.device, products: bool) -> int:
    """Rows per chunk of a rank's compiled scan: 0 (``fused_scan.scan``'s odd-even cyclic reduction, O(m)
    work) where no chunk products are kept; for a rank that keeps them ``fused_chunk``, or FUSED_CHUNK for
    a slice of PRODUCTS_CHUNK_MIN_LENGTH+ rows on CPU. (The forward keeps none: L = 16384, w = 4, 2 ranks,
    CPU per solve of rank 1's apply halves 4.2-4.7 ms with cyclic reduction vs 6.1-6.2 with the 16-row
    chunked scan, rank 0's local + apply 9.4-10.1 vs 10.4-11.5; layer_parallel_cpu_overhead.txt.)"""
    if not products:
        return 0
    chunk = fused_chunk(m, device)
    if chunk == 0 and device.type == "cpu" and m >= PRODUCTS_CHUNK_MIN_LENGTH:
        return FUSED_CHUNK
    return chunk


def _cumulative(A: torch.Tensor, mode: Mode) -> torch.Tensor:
    """``Phi_l = A_l ... A_0`` for every row (PCR on the matrices, out of place)."""
    s = 1
    while s < A.shape[0]:
        A = torch.cat([A[:s], mode.fused_compose(A[s:], A[:-s])])
        s *= 2
    return A


def scan_products(A: torch.Tensor, r: torch.Tensor, mode: Mode, chunk: int) -> tuple:
    """``(d, P, Q)``: ``d`` solves the rows for a zero input (``fused_scan.scan``), and what an input x adds
    to row l, ``Phi_l x`` with ``Phi_l = A_l ... A_0``, is ``propagate(P, Q, x)``: chunked (``chunk`` rows,
    ``fused_scan.chunked``), ``Phi = P_{c,k} Q_{c-1}`` with P the running products inside the chunks that
    sweep forms anyway and Q their cumulative products across chunks; else ``P = Phi``, Q None."""
    length = r.shape[0]
    if not 1 < chunk < length:
        return fused_scan.pcr(A, r, mode), _cumulative(A, mode), None
    d, prods = fused_scan.chunked_with_products(A, r, mode, chunk)
    return d, torch.stack(prods, dim=1), _cumulative(prods[-1], mode)


def propagate(P: torch.Tensor, Q: Optional[torch.Tensor], x: torch.Tensor, mode: Mode, length: int) -> torch.Tensor:
    """``Phi_l x`` for every row (see ``scan_products``)."""
    if Q is None:
        return mode.fused_apply(P, x.unsqueeze(0))
    u = torch.cat([x.unsqueeze(0), mode.fused_apply(Q[:-1], x.unsqueeze(0))])  # what enters chunk c
    add = mode.fused_apply(P, u.unsqueeze(1))  # (C, K, B, n)
    return add.reshape(-1, *x.shape)[:length]
