"""Why a graph has no chain: where the finder looked, and what stopped it, in words for the report.

Called only when ``find_chains`` found nothing. For every floating tensor the finder starts from
(or the lack of one) it says how far the search got: the pieces between single-tensor
bottlenecks on the state's path, whether any consecutive pieces compute the same ops (or the same
ops with different integer constants: ``solution[j] = y`` into a buffer that cannot be treated as a
collector, ``passes/collector_writes.py``, says why not), and whether repeats were dropped because
a step reads another step's intermediate values.
"""
from __future__ import annotations

from typing import Optional

import torch.fx as fx

from .collector_writes import is_write, writes_or_reason
from .find_chains import default_sources, dependents, periodic_runs, pieces
from .find_states import MAX_COMPONENTS
from .shape_prop import info_of

MAX_NOTES = 4  # chain starts explained one by one; the rest are counted


def explain_empty(gm: fx.GraphModule, sources: Optional[list] = None) -> list:
    """Report notes on why no chain was found in ``gm`` (starting from ``sources``, default: the
    floating tensor placeholders)."""
    graph = gm.graph
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if sources is None:
        sources = default_sources(graph)
    if not sources:
        kinds = ", ".join(f"{n.name}: {info_of(n).describe() if info_of(n) else 'unknown'}" for n in inputs) or "none"
        return [f"no chain found: a chain starts from a floating-point tensor input, a floating tensor built "
                f"from constants inside forward, or the first floating tensor computed from the inputs (an "
                f"embedding of token ids), and there is none ({kinds})"]
    notes = []
    # the sources with the longest paths first: a sampler's dozens of schedule constants say little each
    ranked = sorted(sources, key=lambda s: -len(dependents(s)))
    for source in ranked[:MAX_NOTES]:
        ps = pieces(graph, source, gm)
        if len(ps) < 2:
            notes.append(f"no chain found from {source.name}: its path has {len(ps)} piece(s) between single-tensor "
                         f"bottlenecks ({len(dependents(source)) - 1} ops depend on it), and no run of steps handing "
                         f"on a set of at most {MAX_COMPONENTS} tensors repeats; a repeated block needs a small state "
                         "passed from block to block (blocks that each read every earlier block's output, as in a "
                         "DenseNet, leave none)")
            continue
        runs = [r for r in periodic_runs([p.loose for p in ps]) if r[2] >= 2]
        integers = _integers_differ(ps) if not runs else ""
        if integers:
            notes.append(f"no chain found from {source.name}: consecutive blocks compute the same ops but {integers}")
            continue
        if not runs:
            notes.append(f"no chain found from {source.name}: {len(ps)} pieces on its path, but no piece (or group "
                         "of consecutive pieces) repeats: no two consecutive blocks compute the same ops")
            continue
        notes.append(f"no chain found from {source.name}: {len(runs)} repeated run(s) on its path were dropped "
                     "because a step reads a value computed inside the run by another step")
    if len(ranked) > MAX_NOTES:
        notes.append(f"... and {len(ranked) - MAX_NOTES} more chain starts with shorter paths "
                     f"({', '.join(s.name for s in ranked[MAX_NOTES:MAX_NOTES + 5])}, ...)")
    return notes


def _integers_differ(ps: list) -> str:
    """Words for pieces that repeat once their integer constants are ignored (``""``: they do not): a per-step
    integer (``solution[j] = y``, ``x[:, i]``) is no slot, so such blocks are no repeated step."""
    keys = [_no_ints(p.loose) for p in ps]
    runs = [r for r in periodic_runs(keys) if r[2] >= 2]
    if not runs:
        return ""
    start, period, _ = runs[0]
    first, second = ps[start:start + period], ps[start + period:start + 2 * period]
    nodes = [n for p in first for n in p.nodes]
    others = [n for p in second for n in p.nodes]
    differ = [(a, b) for a, b in zip(nodes, others) if _ints(a.args, a.kwargs) != _ints(b.args, b.kwargs)]
    shown = ", ".join(f"{a.name} ({_target(a)}: {_ints(a.args, a.kwargs)}) vs {b.name} ({_ints(b.args, b.kwargs)})"
                      for a, b in differ[:2])
    writes = [a for a, _ in differ if is_write(a) and a.args and isinstance(a.args[0], fx.Node)]
    why = ("a per-step row write (solution[j] = y) is moved after a parallel solve only into a buffer made inside "
           "forward, written at distinct constant rows and read only after its last write; here "
           f"{writes_or_reason(writes[0].args[0])[1] or 'a step reads the buffer'}"
           if writes else "a per-step integer cannot be a stacked input")
    return f"differ in integer constants ({shown}): {why}"


def _no_ints(key):
    if isinstance(key, tuple):
        if len(key) == 2 and key[0] == "int" and type(key[1]) is int:
            return ("int",)
        return tuple(_no_ints(k) for k in key)
    return key


def _ints(*args) -> list:
    found = []

    def walk(a):
        if type(a) is int:
            found.append(a)
        elif isinstance(a, (tuple, list)):
            for v in a:
                walk(v)
        elif isinstance(a, dict):
            for v in a.values():
                walk(v)
        elif isinstance(a, slice):
            walk((a.start, a.stop, a.step))
    walk(args)
    return found


def _target(n: fx.Node) -> str:
    return str(getattr(n.target, "__name__", n.target))
