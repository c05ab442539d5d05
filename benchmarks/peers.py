"""deeppcr vs its peers on the same problems, in one process, one intra-op thread, float32, same weights.

    pip install -e '.[bench]'        # jax (CPU) and matplotlib: benchmarks only
    python benchmarks/peers.py [--quick] [--L 4096 16384] [--w 2 4] [--B 1] [--T 10000] [--n 2 8]
                               [--modes forward train] [--no-gru] [--no-mlp] [--torch-compile off|probe|auto]

Variants (each row: one problem x one variant):
- ``eager``: the sequential PyTorch model (``TanhMLP``: an ``nn.ModuleList`` of Linear + tanh;
  ``GRU``: ``h = GRUCell(x_t, h)`` over t);
- ``torch.compile``: of that model (its first call is its compile time). Inductor unrolls the
  loop, so compile time grows with L (L=1024 w=4 forward: ~130 s on this CPU): it is attempted on
  the probe row (L=1024 w=4 B=1 forward, ``--torch-compile probe``, the default) and elsewhere only
  where the measured seconds per step predict at most ``TC_CAP_S``; the others record why not;
- ``solve``: ``deeppcr.solve(step, x0, per_step=..., config=Config(jacobian="full", backend="eager"))``, cold;
  ``solve_inductor``: the same with ``backend="inductor"`` (each iteration one compiled function);
  ``solve_seqfinish``: the same with ``max_iter=1``, i.e. one iteration then the sequential finish
  (``solve_inductor_seqfinish``: compiled, 16 steps per call);
- ``compile_cold`` / ``compile_warm``: ``deeppcr.compile(model, policy="always")`` with
  ``warm_start=False`` / ``True`` (each timed call gets a fresh input, so a warm start starts from
  another input's solution);
- ``jax_scan``: jitted sequential ``lax.scan``; ``jax_newton``: jitted DEER-style Newton (full
  Jacobians, ``lax.associative_scan``, a while_loop with our tolerance test; its gradient is a
  ``custom_vjp``: one reverse scan + one batched VJP). See ``benchmarks/_peers_jax.py``.

Forward rows run under ``torch.no_grad``; ``train`` rows are forward + backward of ``sum(z_L)``
w.r.t. x0 and all weights (torch: ``loss.backward()``; JAX: ``jax.jit(jax.grad(...))``).
``max_err``: the max abs difference from a float64 sequential loop on one input (the final state,
or for train rows every gradient: x0, W, b). ``compile_s``: first-call seconds (torch.compile,
deeppcr's trace + first solve) or ``jit(...).lower().compile()`` seconds (JAX).

Timing: every timed call gets a fresh input (cycled from ``INPUTS``); the variants alternate in
rounds (a fresh shuffled order each round), so a slow spell of the shared host hits them alike;
a variant under ``SETTLE_S`` runs once untimed before its timed call in each round and keeps the
best of two calls; times are medians over rounds; rows get ``ROW_BUDGET_S`` seconds of rounds (at
least one). ``per_it_ms`` = total / forward Newton iterations. Writes
``benchmarks/results/peers_cpu.csv`` (``_subset`` with a subset flag) and a PNG.
"""
from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import gc  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _peers_jax as pj  # noqa: E402
from _peers_report import print_table, write  # noqa: E402
from _peers_torch import INPUTS, GRUPlainOps, Problem, _flat, gru_step, mlp_step, problems  # noqa: E402

import deeppcr_fx as deeppcr  # noqa: E402

warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented the batching rule")

SETTLE_S = 0.05
SLOW_S = 4.0  # a variant whose call takes longer gets one timed sample (its first call, or one after compiling)
TC_CAP_S = 120.0
TC_PRIOR_S_PER_STEP = 0.13  # torch.compile of TanhMLP(1024, 4), forward: 133 s on this CPU (2026-12-02, load ~2)
PROBE = dict(L=1024, w=4, B=1)


class Variant:
    """``prepare(i)`` (untimed: fresh input i, zero grads) -> arg; ``call(arg)`` (timed, blocking) -> out;
    ``answer(out)`` -> flat float64 array (untimed); ``iterations(out)`` -> int/str or None."""

    def __init__(self, name, prepare, call, answer, iterations=lambda out: None, compile_s=None, note=""):
        self.name, self.prepare, self.call, self.answer, self.iterations = name, prepare, call, answer, iterations
        self.compile_s, self.note, self.times, self.first_s = compile_s, note, [], None


def _torch_variant(name, prob, fn, train, its=lambda out: None):
    """A torch callable of the problem's inputs (a model, compiled or not); train: backward of sum(z_L)."""
    model = prob.model

    def prepare(i):
        inp = prob.inputs[i]
        if not train:
            return inp
        model.zero_grad(set_to_none=True)
        return (inp[0].clone().requires_grad_(), *inp[1:])

    def call(inp):
        if not train:
            with torch.no_grad():
                return fn(*inp)
        out = fn(*inp)
        out.sum().backward()
        return inp[0]

    def answer(out):
        return _flat(prob.model_grads(model, out) if train else [out])

    return Variant(name, prepare, call, answer, its)


def _solve_variant(name, prob, train, **cfg):
    per_step, shared = prob.weights()
    step = mlp_step if prob.kind == "mlp" else gru_step
    config = deeppcr.Config(jacobian="full", **cfg)
    leaves = per_step + shared
    if train:
        for t in leaves:
            t.requires_grad_()

    def prepare(i):
        inp = prob.inputs[i]
        for t in leaves:
            t.grad = None
        x0 = inp[0].clone().requires_grad_() if train else inp[0]
        return x0, per_step + tuple(inp[1:])

    def call(arg):
        x0, ps = arg
        with torch.set_grad_enabled(train):
            res = deeppcr.solve(step, x0, per_step=ps, shared=shared, config=config)
            if train:
                res.states[-1].sum().backward()
        return x0, res

    def answer(out):
        x0, res = out
        if not train:
            return _flat([res.states[-1]])
        return _flat([x0.grad, *(t.grad for t in leaves)])

    def its(out):
        f = out[1].stats.forward
        return f"{f.iterations}" + (f"+seq@{f.sequential_from}" if f.sequential_finish is not None else "")

    return Variant(name, prepare, call, answer, its)


def _pcr_its(compiled):
    gm = getattr(compiled, "graph_module", None)
    solves = [] if gm is None else [m for m in gm.modules() if isinstance(m, deeppcr.PCRSolve) and m.last_stats]
    if not solves:
        rep = getattr(compiled, "report", None)
        why = "" if rep is None else (f"{rep.failure.value}: {rep.failure_detail[:80]}" if rep.failure is not None
                                      else ",".join(str(r) for r in rep.reasons()) or f"{len(rep.rewritten)} rewritten")
        return f"not rewritten ({why})"
    worst = max((m.last_stats.iterations, m.last_stats.forward.prefix) for m in solves)
    return f"{worst[0]}" + (f"+{worst[1]}seq" if worst[1] else "")


def _jax_variants(prob, train):
    per_step, shared = prob.weights()
    ps_j = tuple(pj.to_jax(t) for t in per_step)
    sh_j = tuple(pj.to_jax(t) for t in shared)
    jin = [(pj.to_jax(inp[0]), ps_j + tuple(pj.to_jax(t) for t in inp[1:]), sh_j) for inp in prob.inputs]
    out = []
    for variant in ("scan", "newton"):
        fn = pj.build(prob.kind, variant, train, max_iter=min(prob.L, 64))
        t0 = time.perf_counter()
        exe = pj.compile_fn(fn, *jin[0])
        compile_s = time.perf_counter() - t0
        newton_fwd = variant == "newton" and not train

        def answer(o, newton_fwd=newton_fwd):
            if train:
                dx0, dps, dsh = o
                return _flat([np.asarray(dx0), *map(np.asarray, dps[:len(ps_j)]), *map(np.asarray, dsh)])
            return _flat([np.asarray(o[0] if newton_fwd else o)])

        def its(o, newton_fwd=newton_fwd):
            return None if not newton_fwd else f"{int(o[1])}" + ("" if bool(o[2]) else " (not converged)")

        out.append(Variant(f"jax_{variant}", lambda i: jin[i], lambda a, exe=exe: pj.block(exe(*a)), answer, its,
                           compile_s=compile_s))
    return out


TC = {"s_per_step": None, "probe_done": False}


def _torch_compile_variant(prob, mode, policy):
    is_probe = prob.kind == "mlp" and mode == "forward" and all(prob.params[k] == v for k, v in
                                                                 (("L", PROBE["L"]), ("n", PROBE["w"]),
                                                                  ("B", PROBE["B"])))
    if policy == "off":
        return None, "off (--torch-compile off)"
    if not is_probe:
        # never below the prior: a probe compiled from inductor's warm on-disk cache reads ~10x cheap
        # (11.8 s vs 133 s cold at L=1024), and its train graph then took 342 s (2026-12-02 run)
        measured = TC["s_per_step"] is not None and TC["s_per_step"] > TC_PRIOR_S_PER_STEP
        per_step = TC["s_per_step"] if measured else TC_PRIOR_S_PER_STEP
        predicted = per_step * prob.L * (2 if mode == "train" else 1)
        if predicted > TC_CAP_S:
            return None, (f"skipped: predicted compile {predicted:.0f} s > {TC_CAP_S:.0f} s cap ({per_step * 1e3:.0f} "
                          f"ms/step {'measured on the probe row' if measured else 'prior, cold cache'}"
                          f"{', x2 for backward' if mode == 'train' else ''})")
    torch._dynamo.reset()
    fn = torch.compile(prob.model)
    return _torch_variant("torch.compile", prob, fn, mode == "train"), ""


def variants_for(prob, mode, tc_policy, compile_max_L=None):
    train = mode == "train"
    vs = [_torch_variant("eager", prob, prob.model, train)]
    tc, tc_note = _torch_compile_variant(prob, mode, tc_policy)
    if tc is not None:
        vs.append(tc)
    vs.append(_solve_variant("solve", prob, train, backend="eager"))
    vs.append(_solve_variant("solve_inductor", prob, train, backend="inductor"))  # compile_s: trace + compile + solve
    if not train:
        vs.append(_solve_variant("solve_seqfinish", prob, train, max_iter=1, backend="eager"))
        vs.append(_solve_variant("solve_inductor_seqfinish", prob, train, max_iter=1, backend="inductor"))
    # GRU: deeppcr.compile of the model as written (nn.GRUCell) meets vmap's per-step fallback for
    # aten::gru_cell; measured at T <= 1000 only (compile_GRUCell), the other rows compile GRUPlainOps
    # One compiled module per problem (its trace is paid once per grad mode): compile_cold clears its
    # warm start before each call (untimed; a cold solve starts from x0 repeated, as warm_start=False).
    if compile_max_L is not None and prob.L > compile_max_L:
        return vs + _jax_variants(prob, train), tc_note, f"deeppcr.compile not run at L > {compile_max_L}"
    if prob.compiled is None:
        target = prob.model if prob.kind == "mlp" else GRUPlainOps(prob.model)
        prob.compiled = deeppcr.compile(target, policy="always")
    compiled = prob.compiled
    for name, warm in (("compile_cold", False), ("compile_warm", True)):
        v = _torch_variant(name, prob, compiled, train, its=lambda out: _pcr_its(compiled))
        if not warm:
            v.prepare = _cold(v.prepare, compiled)
        vs.append(v)
    if prob.kind == "gru" and prob.L <= 1000:
        gc_mod = deeppcr.compile(prob.model, policy="always", warm_start=False)
        vs.append(_torch_variant("compile_GRUCell", prob, gc_mod, train, its=lambda out: _pcr_its(gc_mod)))
    vs += _jax_variants(prob, train)
    return vs, tc_note, ""


def _cold(prepare, compiled):
    def cold_prepare(i):
        arg = prepare(i)
        for m in compiled.graph_module.modules() if getattr(compiled, "graph_module", None) else ():
            if isinstance(m, deeppcr.PCRSolve):
                m.reset_warm_start()
        return arg
    return cold_prepare


def _run(v, i):
    arg = v.prepare(i)
    t0 = time.perf_counter()
    out = v.call(arg)
    return time.perf_counter() - t0, out


def measure(prob, mode, tc_policy, budget_s, max_rounds, compile_max_L=None):
    vs, tc_note, compile_note = variants_for(prob, mode, tc_policy, compile_max_L)
    ref = prob.reference(mode == "train")
    rows = {}
    for v in vs:  # first calls (compile), on the check input: errors and iterations
        v.first_s, out = _run(v, INPUTS)
        if v.compile_s is None and v.name not in ("eager", "solve", "solve_seqfinish", "jax_scan", "jax_newton"):
            v.compile_s = v.first_s
        if v.name == "compile_warm":  # shares compile_cold's module, whose first call traced it
            v.compile_s = next((u.compile_s for u in vs if u.name == "compile_cold"), v.compile_s)
        if v.name in ("solve", "solve_seqfinish") and v.compile_s is None:
            v.compile_s = v.first_s  # deeppcr.solve has no compile step: its first call, for reference
        if v.name == "torch.compile" and mode == "forward":
            TC["s_per_step"] = max(TC["s_per_step"] or 0.0, v.first_s / prob.L)
        ans = v.answer(out)
        rows[v.name] = dict(max_err=float(np.max(np.abs(ans - ref))) if ans.shape == ref.shape else float("nan"),
                            iterations=v.iterations(out))
    gc.collect()
    gc.freeze()
    gc.disable()
    rng, calls, spent, rounds = random.Random(0), 0, 0.0, 0
    try:
        while rounds < max_rounds and (rounds == 0 or spent < budget_s):
            gc.collect()
            t_round = time.perf_counter()
            order = vs[:]
            rng.shuffle(order)
            for v in order:
                if v.times and v.times[-1] > SLOW_S or (not v.times and v.first_s > SLOW_S and not v.compile_s):
                    if not v.times:
                        v.times.append(v.first_s)  # a slow call without a compile step: its first call is the sample
                    continue  # slow: one sample (slow rows would not fit a 20-minute run otherwise)
                i = calls % INPUTS
                calls += 1
                if v.first_s <= SETTLE_S or (v.times and min(v.times) <= SETTLE_S):
                    _run(v, (i + 1) % INPUTS)  # untimed: the caches hold this variant, as in a user's loop
                    t1, _ = _run(v, (i + 2) % INPUTS)
                    t, out = _run(v, i)
                    v.times.append(min(t, t1))
                else:
                    t, out = _run(v, i)
                    v.times.append(t)
                its = v.iterations(out)
                if its is not None:
                    rows[v.name].setdefault("its_seen", []).append(str(its))
            spent += time.perf_counter() - t_round
            rounds += 1
    finally:
        gc.enable()
        gc.unfreeze()
    result = []
    for v in vs:
        med = statistics.median(v.times)
        r = dict(prob.params, mode=mode, variant=v.name, ms=1e3 * med, rounds=len(v.times),
                 compile_s=v.compile_s, first_call_s=v.first_s, **rows[v.name])
        seen = r.pop("its_seen", None)
        if seen:  # the most common count over the timed calls (the check input's may differ)
            r["iterations"] = max(set(seen), key=seen.count)
        result.append(r)
    if tc_note:
        result.append(dict(prob.params, mode=mode, variant="torch.compile", note=tc_note))
    if compile_note:
        result.append(dict(prob.params, mode=mode, variant="compile_cold/warm", note=compile_note))
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="L=1024 w=4 B=1 and GRU T=1000 n=4, short budgets")
    ap.add_argument("--L", type=int, nargs="+")
    ap.add_argument("--w", type=int, nargs="+")
    ap.add_argument("--B", type=int, nargs="+")
    ap.add_argument("--T", type=int, nargs="+")
    ap.add_argument("--n", type=int, nargs="+")
    ap.add_argument("--modes", nargs="+", choices=("forward", "train"), default=["forward", "train"])
    ap.add_argument("--no-mlp", action="store_true")
    ap.add_argument("--no-gru", action="store_true")
    ap.add_argument("--torch-compile", choices=("off", "probe", "auto"), default=None,
                    help="probe (default; off with --quick): compile the probe row, predict the rest")
    ap.add_argument("--budget", type=float, default=None, help="seconds of timed rounds per row (default 4, quick 1)")
    ap.add_argument("--rounds", type=int, default=None, help="most rounds per row (default 9, quick 3)")
    ap.add_argument("--all", action="store_true", help="also L=16384 w=16 B=16 (minutes per solve)")
    ap.add_argument("--minutes", type=float, default=18.0,
                    help="start no row after this many minutes (rows run target rows first)")
    ap.add_argument("--compile-max-L", type=int, default=16384,
                    help="deeppcr.compile variants only up to this L (first call at L=16384: 34 s since commit "
                         "76f4525, 110 s before; the 2026-12-02 main run used 4096)")
    ap.add_argument("--compile-max-T", type=int, default=1000,
                    help="deeppcr.compile variants of the GRU only up to this T (T=1000: ~14 s first call)")
    ap.add_argument("--out", default=None, help="csv name under benchmarks/results (default peers_cpu[_subset])")
    args = ap.parse_args(argv)
    subset = any(getattr(args, k) is not None for k in ("L", "w", "B", "T", "n")) or args.no_mlp or args.no_gru \
        or len(args.modes) < 2
    q = args.quick
    args.L = args.L or ([1024] if q else [1024, 4096, 16384])
    args.w = args.w or ([4] if q else [2, 4, 16])
    args.B = args.B or ([1] if q else [1, 16])
    args.T = args.T or ([1000] if q else [1000, 10000])
    args.n = args.n or ([4] if q else [2, 4, 8])
    tc_policy = args.torch_compile or ("off" if q else "probe")
    budget = args.budget if args.budget is not None else (1.0 if q else 4.0)
    max_rounds = args.rounds or (3 if q else 9)
    torch.set_num_threads(1)
    import jax
    print(f"peers: torch={torch.__version__} threads={torch.get_num_threads()} jax={jax.__version__} "
          f"XLA_FLAGS={os.environ['XLA_FLAGS']!r} budget={budget}s/row rounds<={max_rounds} "
          f"torch.compile={tc_policy}", flush=True)
    rows, t_start = [], time.perf_counter()
    for kind, L, n, B, modes in problems(args):
        prob = Problem(kind, L, n, B)
        for mode in modes:
            if time.perf_counter() - t_start > 60 * args.minutes:
                rows.append(dict(prob.params, mode=mode, variant="*", note=f"not run: past --minutes {args.minutes}"))
                print(f"  skipped {kind} L={L} n={n} B={B} {mode}: past --minutes {args.minutes}", flush=True)
                continue
            t0 = time.perf_counter()
            max_L = args.compile_max_L if kind == "mlp" else args.compile_max_T
            rows += measure(prob, mode, tc_policy, budget, max_rounds, max_L)
            print(f"  measured {kind} L={L} n={n} B={B} {mode} in {time.perf_counter() - t0:.0f} s "
                  f"(total {time.perf_counter() - t_start:.0f} s)", flush=True)
    rows.sort(key=lambda r: (r["problem"], r["L"], r["n"], r["B"], r["mode"]))
    print_table(rows)
    name = args.out or ("peers_cpu_subset" if subset else "peers_cpu") + ("_quick" if q else "")
    print(f"wrote {write(rows, name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
