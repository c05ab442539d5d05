"""Chains whose state is a few tensors: an LSTM's ``(h, c)``, a multistep sampler's ``(x, eps_prev)``.

``find_chains`` cuts a source's path where one value is live; a step that hands on several tensors
has no such cut. Here a cut is the *set* of values live across a point. Summary of the algorithm:

1. Source groups: every source alone, and sources of one shape and dtype read by the same op
   (``lstm_cell(x_t, (h0, c0))`` with ``h0``, ``c0`` built inside forward) together; a group's
   dependents are the union of its sources' dependents.
2. Boundaries: after each dependent node, the dependent values defined there or before and used
   after (uses by ``output`` do not count), in the order the next step first reads them. A boundary whose live values are
   1..``MAX_COMPONENTS`` floating tensors may separate two steps.
3. Pieces: the dependent nodes between consecutive boundaries, in ``find_chains``' canonical form
   with the live values as state components ``("S", j)``, plus where each value live after the
   piece comes from (one of its nodes, or a component passed through).
4. Runs of repeated pieces (``periodic_runs``; strict sub-runs for equal shapes). Within a run of
   period p the steps start at the phase whose boundary has the fewest live values (the longest
   such chain). A component every step passes through unchanged — the same node at every
   boundary, e.g. a loop input read by every step — is a shared input, not state.

Candidates come back in ``find_chains``' ``Candidate``/``Segment`` form (``Segment.state_ins``/
``state_outs``); ``find_chains`` pools them with the single-tensor ones (most nodes covered wins).
"""
from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch.fx as fx

from .collector_writes import collector_writes
from .find_chains import Candidate, Segment, _collector, canonical, dependents, periodic_runs, relaxable
from .shape_prop import info_of

MAX_COMPONENTS = 8  # a multistep sampler of order 3 with a corrector carries ~5 tensors
MIN_STEPS = 3  # two repeats of a few nodes carrying several tensors are a coincidence more often than a loop
COVERED_ENOUGH = 0.5  # single-tensor chains covering this share of a source's path: no search here


@dataclass
class _Piece:
    ins: tuple  # live values before the piece (the state components it reads)
    outs: tuple  # live values after it
    nodes: list
    loose: Any = None
    strict: Any = None


def _floating(n: fx.Node) -> bool:
    info = info_of(n)
    return info is not None and info.is_tensor and info.dtype.is_floating_point


def source_groups(sources: list) -> list:
    """Each source alone, then sources of one shape and dtype that a common op reads, together."""
    groups = [(s,) for s in sources]
    parent = {s: s for s in sources}

    def find(s):
        while parent[s] is not s:
            s = parent[s]
        return s

    for i, a in enumerate(sources):
        for b in sources[i + 1:]:
            ia, ib = info_of(a), info_of(b)
            if (ia.shape, ia.dtype) == (ib.shape, ib.dtype) and not set(a.users).isdisjoint(b.users):
                parent[find(b)] = find(a)
    joined = defaultdict(list)
    for s in sources:
        joined[find(s)].append(s)
    return groups + [tuple(g) for g in joined.values() if len(g) > 1]


def _boundaries(order: list, dep: set, relax: bool = False) -> list:
    """``(position, live values)`` after each dependent node whose live values may be a state.

    The live values are ordered by their first use after the boundary (then by argument position in
    that use): the order a step reads its state in, the same at every step of a loop, which the order
    of definition is not (``v0 = zeros_like(x)`` is defined after ``x``, each step's ``v`` before it).
    With ``relax``, uses by collectors (``torch.stack(outputs)``) do not keep values live either, as in
    ``find_chains.cuts`` (whose caller also leaves writes into a collector buffer out of ``dep``)."""
    pos = {n: i for i, n in enumerate(order)}
    last, expire, uses = {}, defaultdict(list), {}
    for n in dep:
        uses[n] = sorted(pos[u] for u in n.users if u in dep and not (relax and _collector(u, dep)))
        last[n] = uses[n][-1] if uses[n] else pos[n]
        expire[last[n]].append(n)
    live: dict = {}
    found = []
    for i, n in enumerate(order):
        if n not in dep:
            continue
        for m in expire.get(i, ()):
            live.pop(m, None)
        if last[n] > i:
            live[n] = None
        if 1 <= len(live) <= MAX_COMPONENTS and all(_floating(m) for m in live):
            found.append((i, tuple(sorted(live, key=lambda m: _first_use(m, uses[m], i, order)))))
    return found


def _first_use(n: fx.Node, uses: list, i: int, order: list) -> tuple:
    first = uses[bisect.bisect_right(uses, i)]
    return first, order[first].all_input_nodes.index(n)


def _state_shapes(nodes: tuple) -> tuple:
    return tuple((info_of(n).shape, info_of(n).dtype) for n in nodes)


def _pieces(order: list, dep: set, gm: fx.GraphModule, relax: bool = False) -> list:
    bounds = _boundaries(order, dep, relax)
    out = []
    for (i, ins), (j, outs) in zip(bounds, bounds[1:]):
        nodes = [n for n in order[i + 1:j + 1] if n in dep]
        local = {n: k for k, n in enumerate(nodes)}
        index = {n: k for k, n in enumerate(ins)}
        where = tuple(("L", local[o]) if o in local else ("S", index.get(o, -1)) for o in outs)
        piece = _Piece(ins, outs, nodes)
        piece.loose = (len(ins), where, canonical(ins, nodes, False, gm).key)
        piece.strict = (piece.loose[:2], _state_shapes(ins), canonical(ins, nodes, True, gm).key)
        out.append(piece)
    return out


def _best_phase(ps: list, start: int, period: int, count: int) -> tuple:
    """``(first piece, segments)`` of the run ``ps[start:start + period * count]`` shifted to the phase whose
    starting boundary has the fewest live values; a shift may reach back before the run or past its end
    where the pieces there follow the same pattern."""
    pattern = [ps[start + k].strict for k in range(period)]

    def matches(m: int) -> bool:
        return 0 <= m < len(ps) and ps[m].strict == pattern[(m - start) % period]

    sizes = [len(ps[start + phase].ins) for phase in range(period)]
    best = None
    for phase in (p for p in range(period) if sizes[p] == min(sizes)):  # only the fewest live values: O(n) matches
        for a in (start + phase, start + phase - period):
            if a < 0 or not matches(a):
                continue
            n = 0
            while all(matches(a + n * period + k) for k in range(period)):
                n += 1
            key = (len(ps[a].ins), -n, a)
            if n >= 2 and (best is None or key < best[0]):
                best = (key, a, n)
    return (None, 0) if best is None else best[1:]


def _steps(ps: list, a: int, period: int, count: int) -> list:
    """``(ins, nodes, outs)`` of each step of the run."""
    chunks = [ps[a + s * period:a + (s + 1) * period] for s in range(count)]
    return [(c[0].ins, [n for x in c for n in x.nodes], c[-1].outs) for c in chunks]


def _extend(steps: list, order: list, dep: set, gm) -> list:
    """One more step where the last one's outputs feed dependent nodes computing the same step again.

    The boundary after a loop's last step is often no boundary at all: its values are used only by
    ``output`` (or not at all: an LSTM's last ``c``), so no piece ends there."""
    ins, nodes, outs = steps[-1]
    key = canonical(ins, nodes, True, gm).key
    local = {n: k for k, n in enumerate(nodes)}
    where = [local.get(o) for o in outs]
    if any(w is None for w in where):
        return steps
    pos = {n: i for i, n in enumerate(order)}
    after = pos[nodes[-1]]
    following = [n for n in order[after + 1:] if n in dep][:len(nodes)]
    if len(following) == len(nodes) and canonical(outs, following, True, gm).key == key:
        steps.append((outs, following, tuple(following[w] for w in where)))
    return steps


def _segments(steps: list, gm) -> list:
    ins = [i for i, _, _ in steps]
    outs = [o for _, _, o in steps]
    keep = [j for j in range(len(ins[0]))  # components passed through unchanged everywhere are shared inputs
            if not all(i[j] is ins[0][j] and o[j] is ins[0][j] for i, o in zip(ins, outs))]
    if not keep:
        return []
    segs = []
    for i, nodes, o in steps:
        state_in, state_out = tuple(i[j] for j in keep), tuple(o[j] for j in keep)
        if len(keep) < len(ins[0]):  # what only the shared inputs feed is state-independent: hoisted
            nodes = _fed_by(state_in, nodes)
        if len(keep) == 1:
            form = canonical(state_in[0], nodes, True, gm)
            segs.append(Segment(state_in[0], state_out[0], nodes, form.externals, form.floats))
        else:
            form = canonical(state_in, nodes, True, gm)
            segs.append(Segment(state_in[0], state_out[0], nodes, form.externals, form.floats, state_in, state_out))
    return segs


def _fed_by(state: tuple, nodes: list) -> list:
    """The nodes (in order) computed from ``state``."""
    fed = set(state)
    for n in nodes:
        if not fed.isdisjoint(n.all_input_nodes):
            fed.add(n)
    return [n for n in nodes if n in fed]


def multi_state_candidates(gm: fx.GraphModule, sources: list, single: list) -> list:
    """Chains with a state of several tensors (or a single-tensor state beside pass-through inputs),
    from every source group whose path the single-tensor candidates ``single`` leave mostly uncovered."""
    order = list(gm.graph.nodes)
    found = []
    for group in source_groups(list(sources)):
        dep = set().union(*(dependents(s) for s in group))
        if len(group) == 1:
            covered = sum(len(c.nodes) for c in single if c.source is group[0] and c.length >= 2)
            if covered >= COVERED_ENOUGH * len(dep):
                continue
        for relax in (False, True):
            if relax and not relaxable(dep):
                continue
            ps = _pieces(order, dep - collector_writes(dep) if relax else dep, gm, relax)
            for start, p, count in periodic_runs([x.loose for x in ps]):
                for s_start, s_p, s_count in periodic_runs([x.strict for x in ps[start:start + p * count]]):
                    a, n = _best_phase(ps, start + s_start, s_p, s_count)
                    segs = _segments(_extend(_steps(ps, a, s_p, n), order, dep, gm), gm) if a is not None else []
                    if len(segs) >= MIN_STEPS:
                        found.append(Candidate(group[0], s_p, segs))
    return found
