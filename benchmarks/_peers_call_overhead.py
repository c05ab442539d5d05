"""Per-call cost of a compiled function: the wrapper around inductor's kernels, not the kernels.

    python benchmarks/_peers_call_overhead.py [--calls 1000] [--rounds 5]

A tiny function (a tanh layer on a (4, 4) state and a flag, two outputs: 3 small kernels) traced with
``make_fx`` and compiled two ways, then called ``--calls`` times in a loop, the ways alternating over
``--rounds`` rounds (medians): ``dynamo``: ``torch.compile(gm, dynamic=False, fullgraph=True)`` (the
backend before: TorchDynamo guards + AOT autograd runtime wrappers on every call); ``direct``:
``runtime.backend.compile_traced`` (inductor's compiled graph called directly); ``eager``: the Python
function itself. One intra-op thread.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from deeppcr_fx.runtime import backend


def tiny(x, W, b, s):
    z = torch.tanh(x @ W + b)
    return z, (z - x).abs().amax() <= s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    inputs = (torch.randn(4, 4), torch.randn(4, 4), torch.randn(4), torch.tensor(0.5))
    from torch.fx.experimental.proxy_tensor import make_fx

    t0 = time.perf_counter()
    dynamo = torch.compile(make_fx(tiny)(*inputs), dynamic=False, fullgraph=True)
    dynamo(*inputs)
    t1 = time.perf_counter()
    direct = backend.compile_traced(tiny, inputs)
    direct(*inputs)
    t2 = time.perf_counter()
    print(f"first call (trace + compile + run): dynamo {t1 - t0:.2f} s, direct {t2 - t1:.2f} s")
    for a, b in zip(dynamo(*inputs), direct(*inputs)):
        torch.testing.assert_close(a, b)
    ways = {"eager": tiny, "dynamo": dynamo, "direct": direct}
    times = {name: [] for name in ways}
    with torch.no_grad():
        for _ in range(args.rounds):
            for name, fn in ways.items():
                for _ in range(20):
                    fn(*inputs)
                t = time.perf_counter()
                for _ in range(args.calls):
                    fn(*inputs)
                times[name].append((time.perf_counter() - t) / args.calls * 1e6)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    for name, m in med.items():
        print(f"{name:7s} {m:7.1f} us/call  (rounds: {', '.join(f'{t:.1f}' for t in times[name])})")
    print(f"dynamo / direct: {med['dynamo'] / med['direct']:.2f}x; wrapper saved per call: "
          f"{med['dynamo'] - med['direct']:.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
