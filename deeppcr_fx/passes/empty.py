"""Why a graph has no chain: where the finder looked, and what stopped it, in words for the report.

Called only when ``find_chains`` found nothing. For every floating tensor the finder starts from
(or the lack of one) it says how far the search got: the pieces between single-tensor
bottlenecks on the state's path, whether any consecutive pieces compute the same ops, and
whether repeats were dropped because a step reads another step's intermediate values.
"""
from __future__ import annotations

from typing import Optional

import torch.fx as fx

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


