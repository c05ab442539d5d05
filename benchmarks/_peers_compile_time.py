"""First-call cost of ``backend="inductor"`` (trace + inductor compile + the solve), cold and in a second process.

    python benchmarks/_peers_compile_time.py [--L 4096] [--w 4] [--B 1] [--cache-dir DIR] [--isa-cache FILE]

Runs itself twice as child processes with ``TORCHINDUCTOR_CACHE_DIR`` set to one directory (a fresh
temporary one unless ``--cache-dir``): the first child compiles with an empty on-disk cache (cold),
the second finds every graph in it (a second process). Each child: a tanh MLP chain (full Jacobians,
float32, one intra-op thread): the first forward solve under ``no_grad`` (compiles the Newton
iteration), then one forward + backward (compiles the adjoint), then both again (warm, for scale).
``--isa-cache``: the file that remembers inductor's C++ vector-ISA probe (``DEEPPCR_ISA_CACHE``,
``runtime/inductor_setup.py``; a new file: the first child probes as on a new machine; ``""``: no
file, every process probes); without it the user's default file. The 1-min load is printed before
and after each child.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time


def _cpu() -> float:
    """CPU seconds of this process and its waited-for children (g++, inductor's probes), user + system."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def child(L: int, w: int, B: int) -> None:
    import torch

    import deeppcr_fx as deeppcr
    torch.set_num_threads(1)

    def mlp_step(z, W, b):
        return torch.tanh(torch.nn.functional.linear(z, W, b))

    g = torch.Generator().manual_seed(0)
    W = (torch.randn(L, w, w, generator=g) / w ** 0.5).requires_grad_()
    b = (torch.randn(L, w, generator=g) * 0.1).requires_grad_()
    x = torch.randn(B, w, generator=g)
    times, compile_s = [], []
    for i in range(2):
        c0, t0 = _cpu(), time.perf_counter()
        with torch.no_grad():
            r = deeppcr.solve(mlp_step, x, per_step=(W, b), jacobian="full", backend="inductor")
        t1 = time.perf_counter()
        if i == 0:
            cpu_first = _cpu() - c0
        compile_s.append(r.stats.compile_s)
        r2 = deeppcr.solve(mlp_step, x, per_step=(W, b), jacobian="full", backend="inductor")
        r2.states[-1].sum().backward()
        times.append((t1 - t0, time.perf_counter() - t1))
    assert r.stats.backend == "inductor" and r2.stats.backward.backend == "inductor", \
        (r.stats.backend_error, r2.stats.backward.backend)
    from torch._dynamo.utils import counters
    fx = {k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph_cache")}
    print(f"first forward {times[0][0]:.2f} s (compile_s {compile_s[0]:.2f}, CPU {cpu_first:.2f} s), first forward+backward "
          f"{times[0][1]:.2f} s; again: {times[1][0] * 1e3:.1f} ms, {times[1][1] * 1e3:.1f} ms; "
          f"{r.stats.forward.iterations} iterations; FX graph cache {fx}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--L", type=int, default=4096)
    ap.add_argument("--w", type=int, default=4)
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--cache-dir")
    ap.add_argument("--isa-cache")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.L, args.w, args.B)
        return 0
    cache = args.cache_dir or tempfile.mkdtemp(prefix="deeppcr_inductor_")
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
    if args.isa_cache is not None:
        env["DEEPPCR_ISA_CACHE"] = args.isa_cache
    print(f"tanh MLP L={args.L} w={args.w} B={args.B}, TORCHINDUCTOR_CACHE_DIR={cache}, "
          f"DEEPPCR_ISA_CACHE={env.get('DEEPPCR_ISA_CACHE', '(default)')}", flush=True)
    for name in ("cold (empty cache)" if not args.cache_dir else "first process", "second process"):
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, "--child", "--L", str(args.L), "--w", str(args.w),
                              "--B", str(args.B)], env=env, capture_output=True, text=True)
        load = os.getloadavg()[0]
        print(f"{name}: {out.stdout.strip() or out.stderr[-2000:]} [process {time.perf_counter() - t0:.1f} s, "
              f"load {load0:.2f} -> {load:.2f}]", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
