"""Cyclic reduction as one generated C++ function on CPU, called from inside the compiled iteration.

``fused_scan.cyclic_reduction`` written as whole-tensor operations compiles to ~6 inductor loops per
halving level (2 log2 L levels), each a broadcast-and-sum over tiny (n, n) blocks on strided halves of
the rows: at L = 16384, n = 4 it was 0.83 ms of a 1.26 ms iteration graph. Here the same algorithm, the
same pairing and the same products (the mode's ``c_products``: ``y = r + A x``, ``C = A_odd A_even``) run
as plain loops over contiguous level arrays in a workspace:

    down   for each level: r'_i = r_{2i+1} + A_{2i+1} r_{2i},  A'_i = A_{2i+1} A_{2i}   (until one row)
    up     for each level: z_{2i+1} = z'_i,  z_0 = r_0,  z_{2i} = r_{2i} + A_{2i} z'_{i-1}

Row 0's A is never read on any level (its products only reach row 0 of the halved systems, whose A is
never read either). The function is an operator of our own (``deeppcr::cyclic_reduction``, a CPU and a Meta
kernel), so ``make_fx`` keeps it as one node and inductor calls it between its own kernels;
one kernel per (dtype, n, mode), compiled by inductor's ``CppPythonBindingsCodeCache`` (cached on disk).
CPU only: ``fused_scan.scan`` keeps the whole-tensor form on other devices, for other modes and for states
wider than ``MAX_WIDTH`` (where these loops were slower).
"""
from __future__ import annotations

import threading

import torch

from .cloop import load
from .cloop_codegen import CTYPE
from .modes import Mode, mode_of

# False: the whole-tensor ``fused_scan.cyclic_reduction`` inside inductor's graph (benchmarks compare both).
# L = 16384 alone, one thread, full mode: n = 2 0.18 vs 0.37 ms, n = 4 0.40 vs 0.83, n = 6 1.4 vs 2.5; but
# n = 8 10.1 vs 3.3 ms and n = 16 103 vs 18 ms (these loops over (n, n) blocks run at ~1 GFLOP/s there;
# n = 12 was 7.2 vs 13.3), so only states of up to MAX_WIDTH elements per sample take it.
ENABLED = True
MAX_WIDTH = 6

_KERNELS: dict = {}
_LOCK = threading.Lock()


def supported(A: torch.Tensor, r: torch.Tensor, mode: Mode) -> bool:
    """Whether ``cyclic_reduction`` runs these (CPU, float32/64, a mode with C++ products, (L, B, n) rows with
    n <= MAX_WIDTH)."""
    return (r.device.type == "cpu" and A.device.type == "cpu" and r.dtype in (torch.float32, torch.float64)
            and A.dtype == r.dtype and r.dim() == 3 and r.shape[-1] <= MAX_WIDTH
            and mode.c_products(r.shape[-1]) is not None and r.shape[0] > 1)


def cyclic_reduction(A: torch.Tensor, r: torch.Tensor, mode: Mode) -> torch.Tensor:
    """``fused_scan.cyclic_reduction(A, r, mode)`` by the C++ kernel (``supported`` must hold)."""
    return torch.ops.deeppcr.cyclic_reduction(A, r, mode.name)


def _cyclic_reduction(A: torch.Tensor, r: torch.Tensor, mode: str) -> torch.Tensor:
    A, r = A.contiguous(), r.contiguous()
    L, B, n = r.shape
    kernel, a_numel = _kernel(r.dtype, n, mode)
    out = torch.empty_like(r)
    work_a = r.new_empty(max(L, 1) * B * a_numel)  # the halved levels: fewer than L rows in all
    work_r = r.new_empty(max(L, 1) * B * n)
    kernel(A, r, out, work_a, work_r, L, B)
    return out


def _meta(A: torch.Tensor, r: torch.Tensor, mode: str) -> torch.Tensor:
    return torch.empty_like(r, memory_format=torch.contiguous_format)


# Registered with the dispatcher directly (a CPU kernel and a Meta one for tracing): ``torch.library.custom_op``'s
# Python wrappers cost ~70 us per call against ~3 us for the kernel at L = 64.
_LIB = torch.library.Library("deeppcr", "DEF")
_LIB.define("cyclic_reduction(Tensor A, Tensor r, str mode) -> Tensor")
_LIB.impl("cyclic_reduction", _cyclic_reduction, "CPU")
_LIB.impl("cyclic_reduction", _meta, "Meta")


def _kernel(dtype: torch.dtype, n: int, mode_name: str):
    key = (dtype, n, mode_name)
    with _LOCK:
        found = _KERNELS.get(key)
        if found is None:
            products = mode_of(mode_name).c_products(n)
            params = [f"const {CTYPE[dtype]}* A", f"const {CTYPE[dtype]}* r", f"{CTYPE[dtype]}* out",
                      f"{CTYPE[dtype]}* work_a", f"{CTYPE[dtype]}* work_r", "int64_t L", "int64_t B"]
            found = _KERNELS[key] = (load(params, source(CTYPE[dtype], n, products)), products["a_numel"])
    return found


def source(ctype: str, n: int, products: dict) -> str:
    """The C++ of the kernel for element type ``ctype``, state width ``n`` and a mode's ``products``."""
    levels = 64  # halving levels of any L < 2^63
    return f"""
#include <cstdint>
#pragma GCC optimize ("tree-loop-vectorize")
typedef {ctype} T;
static const int N = {n};
static const int64_t AN = {products['a_numel']};
static inline void apply_(T* y, const T* r, const T* a, const T* x) {{ {products['apply']} }}
static inline void compose_(T* c, const T* ao, const T* ae) {{ {products['compose']} }}
extern "C" void kernel(const T* A, const T* r, T* out, T* work_a, T* work_r, int64_t L, int64_t B) {{
  const int64_t sa = B * AN, sr = B * N;  // one row of A, of r
  // level j: its A, its rows (level 0: the input r; the others in work_r, solved there in place), its length
  const T* As[{levels}]; T* zs[{levels}]; int64_t ms[{levels}];
  int depth = 0;
  As[0] = A; zs[0] = out; ms[0] = L;
  T* wa = work_a; T* wr = work_r;
  while (ms[depth] > 1) {{  // down: pair each odd row with the even row before it
    const T* Aj = As[depth]; const T* rj = depth == 0 ? r : zs[depth];
    const int64_t half = ms[depth] / 2;
    for (int64_t i = 0; i < half; ++i) {{
      for (int64_t b = 0; b < B; ++b) {{
        const T* ao = Aj + (2 * i + 1) * sa + b * AN;
        apply_(wr + i * sr + b * N, rj + (2 * i + 1) * sr + b * N, ao, rj + 2 * i * sr + b * N);
        if (half > 1) compose_(wa + i * sa + b * AN, ao, Aj + 2 * i * sa + b * AN);
      }}
    }}
    As[depth + 1] = wa; zs[depth + 1] = wr; ms[depth + 1] = half;
    wa += half * sa; wr += half * sr;
    ++depth;
  }}
  if (depth == 0) {{ for (int64_t e = 0; e < sr; ++e) out[e] = r[e]; return; }}
  for (int j = depth - 1; j >= 0; --j) {{  // up: the odd rows from the level below, then the even rows
    const T* Aj = As[j]; const T* rj = j == 0 ? r : zs[j]; const T* zn = zs[j + 1]; T* z = zs[j];
    const int64_t m = ms[j], half = m / 2;
    for (int64_t i = 0; i < half; ++i)  // on levels >= 1, z is r itself (in place); row 0 is final there
      for (int64_t e = 0; e < sr; ++e) z[(2 * i + 1) * sr + e] = zn[i * sr + e];
    if (j == 0) for (int64_t e = 0; e < sr; ++e) z[e] = rj[e];
    for (int64_t i = 1; 2 * i < m; ++i)
      for (int64_t b = 0; b < B; ++b)
        apply_(z + 2 * i * sr + b * N, rj + 2 * i * sr + b * N, Aj + 2 * i * sa + b * AN, z + (2 * i - 1) * sr + b * N);
  }}
}}
"""
