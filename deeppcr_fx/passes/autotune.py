"""``Config.autotune``: time each chain's sequential and parallel variants on the real inputs, keep the faster.

Runs once per input signature, after the pipeline (``pipeline.run_pipeline``), on the
call's own inputs and grad mode:

1. The chains to try: every rewritten chain, and under ``policy="auto"`` also the chains the
   cost model refused whose predicted speed-up is at least ``TRY_FROM`` (0.5x): the
   prediction is conservative, a measurement can overrule it. ``policy="never"`` tunes
   nothing; under ``"always"`` autotuning may revert chains to sequential.
2. Chain by chain, in graph order, two variants of the whole model are timed: the current
   choice with this chain parallel, and with it sequential (other chains as already
   decided). A variant is the emitted graph of the passes re-run with the decisions forced
   (``Context.forced``); the all-sequential variant is the captured graph itself.
   ``time_variants`` runs each once to warm up, then ``REPEATS`` alternating runs, and
   compares medians (a variant more than ``DECISIVE`` times slower after the warm-up is not
   timed further). With a backward pass expected (grad mode on and something requires grad)
   each run is forward + ``backward()`` of the sum of the outputs; otherwise forward only.
3. The faster variant wins (a tie keeps the chain sequential). The report shows both times
   (``ChainRecord.cost["measured"]``: whole-model milliseconds, the Newton iterations of the
   parallel run) and the decision says "autotune".

Autotuning does not change results or state: it runs under ``torch.random.fork_rng``; the
``.grad`` of every Parameter and input, and every buffer's value, are saved before and
restored after; each parallel run starts its solves cold (no warm start from an earlier run,
nor for the first real call), and the solves' recorded stats are cleared afterwards. It
costs a few runs of the model, and a re-run of the passes for each combination of decisions
timed (once per input signature). The TorchDynamo front end is not tuned (it compiles
inside TorchDynamo's tracing, possibly with fake tensors): the report notes it.
"""
from __future__ import annotations

import logging
import statistics
import time
from contextlib import contextmanager
from typing import Callable, Optional

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

from ..results import REWRITTEN, Reason

logger = logging.getLogger(__name__)

TRY_FROM = 0.5  # under "auto", also time chains predicted at >= this speed-up
REPEATS = 3  # alternating timed runs per variant after one warm-up run each
DECISIVE = 3.0  # after the warm-up, a variant this many times slower is not timed further


def _sync(args: tuple) -> None:
    if any(isinstance(a, torch.Tensor) and a.is_cuda for a in args):
        torch.cuda.synchronize()


def run_once(fn: Callable, args: tuple, backward: bool) -> float:
    """Seconds for ``fn(*args)`` (and ``backward()`` of the sum of its outputs when ``backward``)."""
    t0 = time.perf_counter()
    out = fn(*args)
    if backward:
        parts = [t.sum() for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad
                 and t.is_floating_point()]
        if parts:
            torch.stack(parts).sum().backward()
    _sync(args)
    return time.perf_counter() - t0


def time_variants(sequential: Callable, parallel: Callable, args: tuple, backward: bool) -> "tuple[float, float]":
    """``(sequential_s, parallel_s)``: medians of alternating runs after one warm-up run each."""
    seq, par = [run_once(sequential, args, backward)], [run_once(parallel, args, backward)]
    if max(seq[0], par[0]) > DECISIVE * min(seq[0], par[0]):
        return seq[0], par[0]
    seq, par = [], []
    for _ in range(REPEATS):
        seq.append(run_once(sequential, args, backward))
        par.append(run_once(parallel, args, backward))
    return statistics.median(seq), statistics.median(par)


def _solves(gm: Optional[fx.GraphModule]) -> list:
    from ..runtime.pcr_solve import PCRSolve

    return [] if gm is None else [m for m in gm.modules() if isinstance(m, PCRSolve)]


def _cold(gm: fx.GraphModule) -> None:
    """Forget the solves' warm starts so each timed run solves from scratch."""
    for m in _solves(gm):
        m.reset_warm_start()


@contextmanager
def _preserved(modules: list, args: tuple):
    """Restore RNG state, ``.grad`` of Parameters and inputs, and buffer values after timing."""
    tensors = {id(p): p for m in modules for p in m.parameters()}
    tensors.update({id(a): a for a in args if isinstance(a, torch.Tensor) and a.requires_grad})
    grads = {k: t.grad for k, t in tensors.items()}
    buffers = {id(b): (b, b.detach().clone()) for m in modules for b in m.buffers()}
    devices = sorted({a.device.index or 0 for a in args if isinstance(a, torch.Tensor) and a.is_cuda})
    with torch.random.fork_rng(devices=devices):
        try:
            for t in tensors.values():
                t.grad = None
            yield
        finally:
            with torch.no_grad():
                for b, saved in buffers.values():
                    if b.shape == saved.shape:
                        b.copy_(saved)
            for k, t in tensors.items():
                t.grad = grads[k]


def _candidates(report, policy: str) -> list:
    tried = []
    for c in report.chains:
        if c.status == REWRITTEN:
            tried.append(c.index)
        elif policy == "auto" and c.reason is Reason.NOT_PROFITABLE and \
                (c.cost.get("predicted_speedup") or 0.0) >= TRY_FROM:
            tried.append(c.index)
    return tried


def _skip(options) -> Optional[str]:
    if options.config.policy == "never":
        return "policy='never'"
    if options.front_end == "dynamo":
        return "the TorchDynamo front end compiles inside TorchDynamo's tracing"
    from torch._subclasses.fake_tensor import FakeTensor

    if any(isinstance(a, FakeTensor) for a in options.example_inputs):
        return "the example inputs are fake tensors"
    return None


def _text(ms_seq: float, ms_par: float, its: Optional[int], backward: bool) -> str:
    what = "forward + backward" if backward else "forward"
    its = "" if its is None else f", {its} Newton iterations"
    return f"whole model, {what}: sequential {ms_seq:.3g} ms, parallel {ms_par:.3g} ms{its}"


def autotune(result, report, options, capture: fx.GraphModule, build: Callable) -> tuple:
    """The faster variant of every tried chain: ``(PassResult, CompileReport)`` of the chosen graph.

    Arguments:
        result: the pipeline's result under the policy; ``report`` its report.
        options: the ``CompileOptions`` it ran with (inputs, policy, whether a backward pass is expected).
        capture: the captured graph, which runs when every tried chain is sequential.
        build: ``build(forced)`` re-runs the passes on a copy of ``capture`` with ``forced`` decisions
            (chain index -> (parallel, why)) and returns ``(PassResult, CompileReport)``.

    Returns:
        ``(PassResult, CompileReport)`` of the variant kept, its records carrying the measured times.
    """
    why_not = _skip(options)
    if why_not is not None:
        if options.config.policy != "never":
            report.notes.append(f"autotune: not run ({why_not})")
        return result, report
    tried = _candidates(report, options.config.policy)
    if not tried:
        return result, report
    records = {c.index: c for c in report.chains}
    first_set = frozenset(i for i in tried if records[i].status == REWRITTEN)
    variants = {first_set: (result, report)}
    args, backward = tuple(options.example_inputs), options.backward

    def variant(parallel: frozenset):
        if parallel not in variants:
            forced = {i: (i in parallel, "autotune: timing this variant") for i in tried}
            variants[parallel] = build(forced)
        return variants[parallel]

    def runner(parallel: frozenset) -> Callable:
        res = variant(parallel)[0] if parallel else None
        if res is None or not res.modified:
            return capture  # every tried chain sequential: the captured graph as the front end took it
        gm = res.graph_module

        def run(*a):
            _cold(gm)
            return gm(*a)

        return run

    chosen, measured, notes = set(first_set), {}, []
    with _preserved([capture], args):
        for i in tried:
            par_set, seq_set = frozenset(chosen | {i}), frozenset(chosen - {i})
            try:
                t_seq, t_par = time_variants(runner(seq_set), runner(par_set), args, backward)
            except Exception as exc:  # the parallel variant failed on these inputs: keep the chain sequential
                logger.warning("deeppcr autotune: chain #%d failed in parallel: %s", i, exc)
                notes.append(f"autotune: chain #{i}'s parallel variant failed ({type(exc).__name__}: {exc}); "
                             "kept sequential")
                chosen.discard(i)
                continue
            its = _iterations(variant(par_set), i)
            measured[i] = {"sequential_ms": round(1e3 * t_seq, 4), "parallel_ms": round(1e3 * t_par, 4),
                           "iterations": its, "backward": backward, "scope": "whole model"}
            (chosen.add if t_par < t_seq else chosen.discard)(i)
    final = frozenset(chosen)
    out, out_report = variant(final)
    for c in out_report.chains:
        if c.index not in tried:
            continue
        m = measured.get(c.index)
        why = "autotune: the parallel variant failed" if m is None else \
            "autotune measured " + _text(m["sequential_ms"], m["parallel_ms"], m["iterations"], backward)
        if m is not None:
            c.cost = {**c.cost, "measured": m}
        if c.status == REWRITTEN:
            c.decision = f"rewritten (policy='{options.config.policy}', autotune): {why}"
        else:
            c.detail = why
            c.decision = f"kept sequential: {Reason.NOT_PROFITABLE.value}: {why}"
    for res, _ in variants.values():  # the first real call solves as it would have without autotuning
        _cold(res.graph_module)
        for m in _solves(res.graph_module):
            m.reset_stats()
    notes.append(f"autotune: timed {len(measured)} chain(s) on the real inputs (whole model, "
                 f"{'forward + backward' if backward else 'forward'}, median of {REPEATS} alternating runs after "
                 "a warm-up); the faster variant is kept")
    out_report.notes.extend(notes)
    return out, out_report


def _iterations(built: tuple, index: int) -> Optional[int]:
    """Newton iterations of chain ``index``'s latest solve in a built variant."""
    res, built_report = built
    rec = next((c for c in built_report.chains if c.index == index), None)
    if rec is None or rec.submodule is None:
        return None
    try:
        stats = res.graph_module.get_submodule(rec.submodule).last_stats
    except AttributeError:
        return None
    return None if stats is None else stats.iterations
