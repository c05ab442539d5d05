"""Vectorised float32 exp, tanh and sigmoid for the generated row loop (``rowloop``), as C++ source.

Why: in the row loop of a tanh MLP (w = 4) or a GRU cell, libm's scalar ``tanhf``/``expf`` were ~85% of
the time (L = 4096, w = 4: 319 us per pass with ``std::tanh``, 38 us with the tanh left out; g++ 12,
AVX2). ``rowloop`` therefore runs a float32 step in blocks of ``BLOCK_ROWS`` rows: the code between two
transcendental ops runs row by row, and each exp/tanh/sigmoid runs over the block's rows at once, 8
lanes at a time, with the functions below (GCC/Clang vector extensions: AVX2 where ``-march=native`` has
it, two SSE halves otherwise). JAX's CPU backend takes the same route (XLA's polynomial tanh).

Accuracy (against float64, float32 inputs sampled over the whole range, g++ 12): exp 0.95 ulp, tanh
1.20 ulp, sigmoid 1.97 ulp (libm's ``tanhf`` here: 2.19 ulp). NaN propagates, exp(+-inf) = inf / 0,
exp underflows gradually through the denormals, tanh(+-inf) = +-1. Cephes' coefficients: exp as
``2^n * p(r)`` with ``r = x - n ln 2`` in two parts; tanh as an odd polynomial below |x| = 0.625 and
``1 - 2 / (exp(2|x|) + 1)`` above.

Only the row loop's linearisation uses these: a Newton iterate converges to the fixed point of the
steps it evaluates, within the solve's tolerance (rtol 1e-6 in float32, ~8 ulp), and the sequential
finish (``cloop``) keeps libm, so a chain that finishes sequentially gets eager's exact rounding.
"""
from __future__ import annotations

import torch

BLOCK_ROWS = 8  # rows per block: one 8-lane vector per element of a row's intermediate

# aten op -> the C++ function applied to a block's array (float32 only)
VECTOR_UNARY = {"exp": "dp_vexp", "tanh": "dp_vtanh", "sigmoid": "dp_vsigmoid"}
VECTOR_DTYPES = (torch.float32,)

MARK = "//@vector"  # a line of the generator's body: "//@vector <function> <buffer> <numel>"


def mark(function: str, buf: str, numel: int) -> str:
    return f"{MARK} {function} {buf} {numel}"


def parse(line: str):
    """``(function, buffer, numel)`` of a mark line, None for any other line."""
    if not line.startswith(MARK):
        return None
    _, function, buf, numel = line.split()
    return function, buf, int(numel)


SOURCE = r"""
#include <cstring>
typedef float dpv8f __attribute__((vector_size(32)));
typedef int32_t dpv8i __attribute__((vector_size(32)));
static inline dpv8f dp_splat(float v) { return dpv8f{} + v; }
static inline dpv8f dp_vexp(dpv8f x) {
  const dpv8f hi = dp_splat(88.7228391f), lo = dp_splat(-103.972f);
  dpv8f c = x > hi ? hi : (x < lo ? lo : x);
  dpv8f n = (c * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  dpv8f r = c - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  dpv8f p = dp_splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f; p = p * r + 8.3334519073e-3f; p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f; p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  dpv8i i = __builtin_convertvector(n, dpv8i);
  dpv8i i1 = i >> 1, i2 = i - i1;  // 2^n as two factors: gradual underflow below 2^-126
  dpv8f y = p * (dpv8f)((i1 + 127) << 23) * (dpv8f)((i2 + 127) << 23);
  y = x > hi ? dp_splat(INFINITY) : (x < lo ? dp_splat(0.0f) : y);
  return x != x ? x : y;
}
static inline dpv8f dp_vtanh(dpv8f x) {
  dpv8f a = x < 0.0f ? -x : x;
  dpv8f z = x * x;
  dpv8f p = dp_splat(-5.70498872745e-3f);
  p = p * z + 2.06390887954e-2f; p = p * z - 5.37397155531e-2f; p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  dpv8f small = p * z * x + x;
  dpv8f e = dp_vexp(2.0f * (a > 9.1f ? dp_splat(9.1f) : a));
  dpv8f big = 1.0f - 2.0f / (e + 1.0f);
  big = x < 0.0f ? -big : big;
  dpv8f y = a < 0.625f ? small : big;
  return x != x ? x : y;
}
static inline dpv8f dp_vsigmoid(dpv8f x) { return 1.0f / (1.0f + dp_vexp(-x)); }
template <dpv8f (*F)(dpv8f)> static inline void dp_vapply(float* p, int64_t n) {
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) { dpv8f v; std::memcpy(&v, p + k, 32); v = F(v); std::memcpy(p + k, &v, 32); }
  if (k < n) { dpv8f v = {}; std::memcpy(&v, p + k, 4 * (n - k)); v = F(v); std::memcpy(p + k, &v, 4 * (n - k)); }
}
"""
