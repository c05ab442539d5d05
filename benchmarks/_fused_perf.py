"""Probes of benchmarks/results/peers_cpu_fused_perf.txt (issue 14), each old vs new in one process,
alternating, fresh input per call, medians; one intra-op thread, float32.

    python benchmarks/_fused_perf.py finish --L 4096 16384 --w 2 4     # compiled sequential finish: torch.stack
        chunk (before) vs one output buffer (now), and jitted lax.scan; solve(max_iter=1) as peers.py's seqfinish
    python benchmarks/_fused_perf.py cloop --L 4096 16384 --w 2 4 --T 10000 --n 2 4  # the finish: C++ loop,
        inductor chunk, eager, lax.scan (and solve(max_iter=1)), benchmarks/results/finish_cloop_cpu.txt
    python benchmarks/_fused_perf.py flush --L 4096 --w 4 [--gain1]    # compiled solve (fwd), flush_denormals off/on
    python benchmarks/_fused_perf.py record                            # the old per-iteration stats record's ops
    python benchmarks/_fused_perf.py scans --L 4096 16384 --w 2 4      # compiled solve: PCR, cyclic reduction,
        PCR across 16-row chunks (benchmarks/results/scans_cpu.txt)
    python benchmarks/_fused_perf.py rows --L 4096 16384 --w 2 4 --T 10000 --n 2 4  # compiled solve: linearise
        as rowloop.py's C++ row loop vs inside the inductor graph, and JAX Newton (benchmarks/results/rows_cpu.txt)
"""
from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _peers_torch import INPUTS, Problem, mlp_step  # noqa: E402

import deeppcr_fx as deeppcr  # noqa: E402
from deeppcr_fx.runtime import fused, fused_scan, fused_solve  # noqa: E402


class StackChunk(fused.SequentialChunk):
    """The finish chunk before this change: the K steps' states stacked at the end."""

    def __call__(self, z, *args):
        per_step, shared = args[:self.n_per_step], args[self.n_per_step:]
        out = []
        for k in range(self.chunk):
            z = self.spec.flatten(self.step(self.spec.unflatten(z), *(p[k] for p in per_step), *shared))
            out.append(z)
        return torch.stack(out)


def load():
    return os.getloadavg()[0]


def timed(fn, rounds, names):
    """Alternate the callables ``fn[name](i)`` over rounds (fresh input i each call); median seconds."""
    times = {n: [] for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            fn[n](r % INPUTS)
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(v) for n, v in times.items()}


def finish(args):
    import _peers_jax as pj
    for L in args.L:
        for w in args.w:
            prob = Problem("mlp", L, w, 1)
            per_step, shared = prob.weights()
            # two copies of the step: two cache entries, one compiled with each chunk formulation
            steps = {"stack": lambda z, W, b: mlp_step(z, W, b), "buffer": lambda z, W, b: mlp_step(z, W, b)}
            fn, compile_s = {}, {}
            for name, step in steps.items():
                fused_solve.SequentialChunk = StackChunk if name == "stack" else fused.SequentialChunk

                def call(i, step=step):
                    with torch.no_grad():
                        return deeppcr.solve(step, prob.inputs[i][0], per_step=per_step, jacobian="full",
                                             backend="inductor", max_iter=1, flush_denormals=args.flush)
                res = call(0)  # compiles the iteration and the finish
                compile_s[name] = res.stats.compile_s
                assert res.stats.forward.sequential_finish is not None
                fn[name] = call
            fused_solve.SequentialChunk = fused.SequentialChunk
            x = [pj.to_jax(t) for t in per_step]
            jin = [(pj.to_jax(prob.inputs[i][0]), tuple(x), ()) for i in range(INPUTS)]
            exe = pj.compile_fn(pj.build("mlp", "scan", False, max_iter=64), *jin[0])
            fn["lax.scan"] = lambda i: pj.block(exe(*jin[i]))
            l0 = load()
            t = timed(fn, args.rounds, ["stack", "buffer", "lax.scan"])
            print(f"MLP L={L} w={w} chunk={fused.finish_chunk(L)}: seqfinish ms stack {t['stack'] * 1e3:.2f}  "
                  f"buffer {t['buffer'] * 1e3:.2f}  lax.scan {t['lax.scan'] * 1e3:.3f}  stack/buffer "
                  f"{t['stack'] / t['buffer']:.2f}x  buffer/scan {t['buffer'] / t['lax.scan']:.0f}x  "
                  f"[load {l0:.1f}-{load():.1f}]", flush=True)


def finish_cloop(args):
    """The sequential finish of the whole chain (start 0) per call, in one process: the generated C++ loop
    (runtime/cloop.py), the compiled inductor chunk (fused.SequentialChunk, finish_chunk(L) steps per call),
    the eager loop (solve.py's finish), jitted lax.scan (_peers_jax.py's "scan"); and solve(max_iter=1), which
    finishes with the C++ loop, for context. Every variant is checked against the eager loop first."""
    import _peers_jax as pj
    from _peers_torch import gru_step

    from deeppcr_fx.runtime import backend, cloop
    from deeppcr_fx.runtime.state import StateSpec
    rows = [("mlp", L, w) for L in args.L for w in args.w] + [("gru", T, n) for T in args.T for n in args.n]
    for kind, L, w in rows:
        prob = Problem(kind, L, w, 1)
        weights, shared = prob.weights()
        step = mlp_step if kind == "mlp" else gru_step

        def ins(i):  # fresh input per call: x0 and, for the GRU, the per-step inputs x_t
            return prob.inputs[i][0], weights + tuple(prob.inputs[i][1:])
        x0, ps = ins(0)
        spec = StateSpec.of(x0, None)
        t0 = time.perf_counter()
        loop = cloop.compile_loop(step, spec, ps, shared, x0)
        cloop_s = time.perf_counter() - t0
        chunk = fused.finish_chunk(L)
        t0 = time.perf_counter()
        chunk_args = fused.finish_args(x0, ps, shared, 0, chunk)
        chunk_fn = backend.compile_traced(fused.SequentialChunk(step, spec, len(ps), chunk), chunk_args)
        chunk_fn(*chunk_args)
        chunk_s = time.perf_counter() - t0
        U = {n: torch.empty(L, 1, w) for n in ("cloop", "inductor", "eager")}

        def eager(i):
            x0, ps = ins(i)
            with torch.no_grad():
                z = x0
                for l in range(L):
                    z = U["eager"][l] = spec.flatten(step(spec.unflatten(z), *(p[l] for p in ps), *shared))

        def solve1(i):
            x0, ps = ins(i)
            with torch.no_grad():
                res = deeppcr.solve(step_s, x0, per_step=ps, shared=shared, jacobian="full", backend="inductor",
                                    max_iter=1)
            assert res.stats.forward.finish_backend == "cloop", res.stats.forward.finish_error
        step_s = lambda *a: step(*a)  # noqa: E731 - its own cache entries
        t0 = time.perf_counter()
        solve1(0)
        solve_s = time.perf_counter() - t0
        sh_j = tuple(pj.to_jax(t) for t in shared)
        jin = [(pj.to_jax(inp[0]), tuple(pj.to_jax(t) for t in ins(i)[1]), sh_j) for i, inp in enumerate(prob.inputs)]
        exe = pj.compile_fn(pj.build(kind, "scan", False, max_iter=64), *jin[0])
        fn = {"cloop": lambda i: loop(0, U["cloop"], *ins(i), shared),
              "inductor": lambda i: fused.run_finish(chunk_fn, chunk, 0, U["inductor"], *ins(i), shared),
              "eager": eager, "lax.scan": lambda i: pj.block(exe(*jin[i])), "solve1": solve1}
        for n in fn:
            fn[n](INPUTS - 1)
        err = {n: float((U[n] - U["eager"]).abs().max()) for n in ("cloop", "inductor")}
        err["lax.scan"] = float(abs(torch.from_numpy(np.array(fn["lax.scan"](INPUTS - 1))) - U["eager"][-1]).max())
        l0 = load()
        t = timed(fn, args.rounds, list(fn))
        name = f"MLP L={L} w={w}" if kind == "mlp" else f"GRU T={L} n={w}"
        print(f"{name} B=1: finish ms cloop {t['cloop'] * 1e3:.3f}  inductor(K={chunk}) {t['inductor'] * 1e3:.2f}  "
              f"eager {t['eager'] * 1e3:.1f}  lax.scan {t['lax.scan'] * 1e3:.3f}  | cloop/lax.scan "
              f"{t['cloop'] / t['lax.scan']:.2f}x  inductor/cloop {t['inductor'] / t['cloop']:.0f}x  eager/cloop "
              f"{t['eager'] / t['cloop']:.0f}x  | solve(max_iter=1) {t['solve1'] * 1e3:.2f} ms  | compile s cloop "
              f"{cloop_s:.1f} inductor {chunk_s:.1f} solve {solve_s:.1f}  | max|diff| vs eager "
              + " ".join(f"{k} {v:.1e}" for k, v in err.items()) + f"  [load {l0:.1f}-{load():.1f}]", flush=True)


def flush(args):
    for L in args.L:
        for w in args.w:
            prob = Problem("mlp", L, w, 1)
            per_step, shared = prob.weights()
            if args.gain1:  # the weights of peers_cpu_fused_direct.txt's denormal probe
                g = torch.Generator().manual_seed(0)
                per_step = (torch.randn(L, w, w, generator=g) / w ** 0.5, torch.randn(L, w, generator=g) * 0.1)
            fn, its = {}, {}
            for f in (False, True):
                def call(i, f=f):
                    with torch.no_grad():
                        return deeppcr.solve(mlp_step, prob.inputs[i][0], per_step=per_step, jacobian="full",
                                             backend="inductor", flush_denormals=f)
                its[f] = call(0).stats.forward.iterations
                fn[f] = call
            l0 = load()
            t = timed(fn, args.rounds, [False, True])
            print(f"MLP L={L} w={w}{' gain-1 W' if args.gain1 else ''}: compiled solve ms off {t[False] * 1e3:.2f} "
                  f"({its[False]} it)  on {t[True] * 1e3:.2f} ({its[True]} it)  off/on {t[False] / t[True]:.2f}x  "
                  f"[load {l0:.1f}-{load():.1f}]", flush=True)


def record(args):
    U = torch.randn(4096, 1, 4)
    start, worst, status = torch.tensor(3), torch.tensor(0.5), torch.tensor(0, dtype=torch.int8)
    n = 20000
    t = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(n):
            torch.stack([start.to(U.dtype), worst.detach().clone(), status.to(U.dtype)])
        t.append((time.perf_counter() - t0) / n)
    print(f"old record per iteration: {statistics.median(t) * 1e6:.1f} us [load {load():.1f}]")


def scans(args):
    """Compiled forward solve with each scan the compiled iteration can use: plain PCR, odd-even cyclic
    reduction, and PCR across FUSED_CHUNK-row chunks: first call and ms per iteration, alternating rounds."""
    cr = fused_scan.cyclic_reduction
    variants = {"pcr": (0, fused_scan.pcr), "cr": (0, cr), "chunked": (fused.FUSED_CHUNK, cr)}
    for L in args.L:
        for w in args.w:
            prob = Problem("mlp", L, w, 1)
            per_step, _ = prob.weights()
            fn, first, its = {}, {}, {}
            for name, (chunk, plain) in variants.items():
                step = (lambda z, W, b: mlp_step(z, W, b))  # its own cache entry per variant

                def call(i, step=step, chunk=chunk, plain=plain):
                    fused_solve.CompiledForward.chunk = chunk
                    fused_scan.cyclic_reduction = plain  # what fused_scan.scan calls (read at trace time)
                    with torch.no_grad():
                        return deeppcr.solve(step, prob.inputs[i][0], per_step=per_step, jacobian="full",
                                             backend="inductor")
                t0 = time.perf_counter()
                res = call(0)
                first[name], its[name] = time.perf_counter() - t0, res.stats.forward.iterations
                fn[name] = call
            l0 = load()
            t = timed(fn, args.rounds, list(fn))
            cells = "  ".join(f"{k} {t[k] * 1e3:.2f} ms ({its[k]} it, {t[k] * 1e3 / its[k]:.3f}/it, first "
                              f"{first[k]:.1f} s)" for k in fn)
            print(f"MLP L={L} w={w}: {cells}  pcr/cr per it {t['pcr'] / its['pcr'] / (t['cr'] / its['cr']):.2f}x"
                  f"  [load {l0:.1f}-{load():.1f}]", flush=True)


def rows(args):
    """Compiled forward solve (full) with the linearise as rowloop.py's C++ row loop ("rows") vs inside the one
    inductor graph ("graph", fused_solve.ROW_LOOP off at build), and the jitted JAX Newton (_peers_jax.py's
    "newton", as peers.py calls it): alternating rounds, fresh input per call, medians of ms per solve and per
    iteration (each call's time / its own iteration count); results checked against each other first."""
    import _peers_jax as pj
    from _peers_torch import gru_step
    cases = [("mlp", L, w) for L in args.L for w in args.w] + [("gru", T, n) for T in args.T for n in args.n]
    for kind, L, w in cases:
        prob = Problem(kind, L, w, 1)
        weights, shared = prob.weights()
        base = mlp_step if kind == "mlp" else gru_step

        def ins(i):
            return prob.inputs[i][0], weights + tuple(prob.inputs[i][1:])
        fn, its, first = {}, {}, {}
        for name in ("rows", "graph"):
            step = (lambda *a: base(*a))  # its own cache entries per variant

            def call(i, step=step, name=name):
                x0, ps = ins(i)
                with torch.no_grad():
                    res = deeppcr.solve(step, x0, per_step=ps, shared=shared, jacobian="full", backend="inductor")
                its[name].append(res.stats.forward.iterations)
                return res
            its[name] = []
            fused_solve.ROW_LOOP = name == "rows"
            t0 = time.perf_counter()
            res = call(0)
            first[name] = time.perf_counter() - t0
            assert res.stats.forward.linearise_backend == ("rows" if name == "rows" else "inductor"), \
                res.stats.forward.linearise_error
            fn[name] = call
        fused_solve.ROW_LOOP = True
        if args.train:
            train_rows(kind, L, w, base, ins, shared, args.rounds)
            continue
        sh_j = tuple(pj.to_jax(t) for t in shared)
        jin = [(pj.to_jax(inp[0]), tuple(pj.to_jax(t) for t in ins(i)[1]), sh_j) for i, inp in enumerate(prob.inputs)]
        exe = pj.compile_fn(pj.build(kind, "newton", False, max_iter=min(L, 64)), *jin[0])
        its["jax"] = []

        def jax_call(i):
            out = pj.block(exe(*jin[i]))
            its["jax"].append(int(out[1]))
            return out
        fn["jax"] = jax_call
        a, b, j = fn["rows"](INPUTS - 1), fn["graph"](INPUTS - 1), fn["jax"](INPUTS - 1)
        diff = float((a.states[-1] - b.states[-1]).abs().max())
        diff_j = float((a.states[-1] - torch.from_numpy(np.array(j[0]))).abs().max())
        for v in its.values():
            v.clear()
        times = {n: [] for n in fn}
        l0 = load()
        for r in range(args.rounds):
            for n in (list(fn) if r % 2 == 0 else list(fn)[::-1]):
                t0 = time.perf_counter()
                fn[n](r % INPUTS)
                times[n].append(time.perf_counter() - t0)
        med = {n: statistics.median(v) * 1e3 for n, v in times.items()}
        per = {n: statistics.median(t * 1e3 / max(k, 1) for t, k in zip(times[n], its[n])) for n in fn}
        name = f"MLP L={L} w={w}" if kind == "mlp" else f"GRU T={L} n={w}"
        cells = "  ".join(f"{n} {med[n]:.2f} ms ({statistics.median(its[n]):g} it, {per[n]:.3f}/it)" for n in fn)
        print(f"{name} B=1: {cells}  | per it: rows/jax {per['rows'] / per['jax']:.2f}x  graph/jax "
              f"{per['graph'] / per['jax']:.2f}x  graph/rows {per['graph'] / per['rows']:.2f}x  | first s rows "
              f"{first['rows']:.1f} graph {first['graph']:.1f}  | max|diff| rows-graph {diff:.1e} rows-jax "
              f"{diff_j:.1e}  [load {l0:.1f}-{load():.1f}]", flush=True)


def train_rows(kind, L, w, base, ins, shared, rounds):
    """``rows --train``: forward + backward (full, the compiled adjoint) per call, the row loop for the Jacobians
    of both vs the one-graph iteration and adjoint; the gradients checked against each other first."""
    fn, out = {}, {}
    for name in ("rows", "graph"):
        step = (lambda *a: base(*a))

        def call(i, step=step, name=name):
            x0, ps = ins(i)
            x0 = x0.clone().requires_grad_()
            ps = tuple(p.clone().requires_grad_() for p in ps)
            sh = tuple(t.clone().requires_grad_() for t in shared)
            res = deeppcr.solve(step, x0, per_step=ps, shared=sh, jacobian="full", backend="inductor")
            out[name] = torch.autograd.grad(res.states.sin().sum(), (x0, *ps, *sh))
            assert res.stats.backward.linearise_backend == ("rows" if name == "rows" else "inductor")
        fused_solve.ROW_LOOP = name == "rows"
        call(0)
        fn[name] = call
    fused_solve.ROW_LOOP = True
    diff = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(out["rows"], out["graph"]))
    l0 = load()
    t = timed(fn, rounds, list(fn))
    name = f"MLP L={L} w={w}" if kind == "mlp" else f"GRU T={L} n={w}"
    print(f"{name} B=1 fwd+bwd: rows {t['rows'] * 1e3:.2f} ms  graph {t['graph'] * 1e3:.2f} ms  graph/rows "
          f"{t['graph'] / t['rows']:.2f}x  | max rel diff of the gradients {diff:.1e}  [load {l0:.1f}-{load():.1f}]",
          flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["finish", "cloop", "flush", "record", "scans", "rows"])
    ap.add_argument("--L", type=int, nargs="*", default=[4096])
    ap.add_argument("--w", type=int, nargs="+", default=[4])
    ap.add_argument("--T", type=int, nargs="*", default=[], help="cloop: GRU lengths")
    ap.add_argument("--n", type=int, nargs="+", default=[2, 4], help="cloop: GRU widths")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--gain1", action="store_true")
    ap.add_argument("--flush", action="store_true")
    ap.add_argument("--train", action="store_true", help="rows: forward + backward, row loop vs one graph")
    a = ap.parse_args()
    print(f"$ python benchmarks/_fused_perf.py {' '.join(sys.argv[1:])}\nstart {time.strftime('%H:%M:%S')} "
          f"load {load():.2f}", flush=True)
    {"finish": finish, "cloop": finish_cloop, "flush": flush, "record": record, "scans": scans,
     "rows": rows}[a.what](a)

