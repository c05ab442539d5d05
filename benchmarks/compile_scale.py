"""Compile time and memory against depth: the first call of ``deeppcr.compile`` on a deep tanh MLP.

The first call traces the model, runs the passes (shapes, chains, validation, cost model, rewrite)
and solves once; the second call only solves. Each depth runs in a fresh process, so peak RSS is
the compile's own. The first call's CPU time (this process's, ``time.process_time``) is printed
beside its wall time: on a shared machine the wall time grows with the load, the CPU time much less.
Usage::

    python benchmarks/compile_scale.py [--L 5000 50000] [--width 4]

Prints, per depth: first call (wall and CPU s), second call (s), peak RSS (MiB) and the chains found.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def one(L: int, width: int) -> dict:
    import torch
    import torch.nn as nn

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import deeppcr_fx as deeppcr

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(L) for m in (nn.Linear(width, width), nn.Tanh())])
    compiled = deeppcr.compile(model, policy="always", backend="eager")
    start, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        compiled(torch.randn(1, width))
    first, first_cpu = time.perf_counter() - start, time.process_time() - cpu
    start = time.perf_counter()
    with torch.no_grad():
        compiled(torch.randn(1, width))
    second = time.perf_counter() - start
    return {"L": L, "first_s": first, "first_cpu_s": first_cpu, "second_s": second,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "chains": [c.length for c in compiled.report.rewritten]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--L", type=int, nargs="+", default=[5000, 50000])
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--child", type=int, default=None)
    a = ap.parse_args()
    if a.child is not None:
        print(json.dumps(one(a.child, a.width)))
        return
    print(f"{'L':>7} {'first call s':>13} {'(CPU s)':>8} {'second call s':>14} {'peak RSS MiB':>13}  chains")
    for L in a.L:
        out = subprocess.run([sys.executable, __file__, "--child", str(L), "--width", str(a.width)],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{r['L']:>7} {r['first_s']:>13.1f} {r['first_cpu_s']:>8.1f} {r['second_s']:>14.3f} "
              f"{r['peak_rss_mib']:>13.0f}  {r['chains']}", flush=True)


if __name__ == "__main__":
    main()
