"""Find chains: reroll the unrolled loops of a traced graph.

Summary of the algorithm (DESIGN.md §2):

1. Pick a *source*: a floating tensor placeholder. Its dependents are every node reachable
   from it; everything else is state-independent (parameters, conditioning, timestep
   embeddings, pre-sampled noise).
2. Cut the dependents at single-tensor bottlenecks: walking the graph in order, node ``v``
   is a cut when no other dependent value is live across it (uses by ``output`` do not
   count; a second, relaxed analysis also ignores collectors such as
   ``torch.stack(hidden_states)`` and row writes into a collector buffer, ``solution[j] = y``
   (``passes/collector_writes.py``), so models that gather every state keep their cuts).
3. Each piece between consecutive cuts gets a canonical form: ``(op, target, argument
   structure)`` where arguments are the piece's input state, its own nodes by position,
   external values by first-use slot, and constants — never node names. Floats are
   slots too (a per-step constant such as a schedule coefficient may differ per step).
   A *loose* key leaves shapes out; a *strict* key adds every shape and dtype
   (``passes/canonical.py``; one walk per piece makes both).
4. Runs: the longest stretches of pieces that repeat with some period ``p``; greedily
   keep the runs that cover the most pieces (ties: smaller ``p``, earlier start) without
   overlap. A loose run with no strict sub-run of >= 2 segments is reported as a chain
   whose segment shapes differ.

Candidates that read a value computed inside their own range by another segment are
dropped (``_self_contained``). Nothing here mutates the graph; ``validate`` judges the
candidates, ``rewrite`` acts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch.fx as fx

from .canonical import _slots, canonical, map_args  # noqa: F401 (map_args: the one traversal, also here)
from .collector_writes import collector_writes
from .sources import default_sources


@dataclass
class Segment:
    """One step of a chain: ``p`` consecutive pieces from ``state_in`` to ``state_out``."""

    state_in: fx.Node
    state_out: fx.Node
    nodes: list  # the state-dependent nodes, in graph order
    externals: list  # state-independent values read, in first-use order (slots)
    floats: list  # float constants, in traversal order (slots)
    # a state of several tensors (passes/find_states.py): its components, in definition order; state_in and
    # state_out are then the first components (names for the report). Empty for a single-tensor state.
    state_ins: tuple = ()
    state_outs: tuple = ()

    @property
    def ins(self) -> tuple:
        """The state's components entering this step (one node for a single-tensor state)."""
        return self.state_ins or (self.state_in,)

    @property
    def outs(self) -> tuple:
        return self.state_outs or (self.state_out,)


@dataclass
class Candidate:
    source: fx.Node
    period: int
    segments: list
    shapes_differ: bool = False

    @property
    def length(self) -> int:
        return len(self.segments)

    @property
    def nodes(self) -> list:
        return [n for s in self.segments for n in s.nodes]

    @property
    def components(self) -> int:
        """How many tensors the state is (1: a single tensor; more: a tuple state)."""
        return len(self.segments[0].ins)


@dataclass
class _Piece:
    state_in: fx.Node
    state_out: fx.Node
    nodes: list
    loose: Any = None
    strict: Any = None
    form: Any = None  # its _Form: externals and floats, for a chain of period 1


# --- cuts --------------------------------------------------------------------------------
def dependents(source: fx.Node) -> set:
    seen, stack = {source}, [source]
    while stack:
        for user in stack.pop().users:
            if user.op != "output" and user not in seen:
                seen.add(user)
                stack.append(user)
    return seen


def _collector(node: fx.Node, dep: set) -> bool:
    """A node gathering >= 3 state-dependent values (``torch.stack(hidden_states)``)."""
    return len([a for a in node.all_input_nodes if a in dep]) >= 3


def relaxable(dep: set) -> bool:
    """Whether a relaxed search can differ: ``dep`` has a collector or writes into a collector buffer."""
    return any(_collector(n, dep) for n in dep) or bool(collector_writes(dep))


def cuts(graph: fx.Graph, source: fx.Node, relax: bool = False) -> tuple[list, set]:
    """Dependent nodes where no other dependent value is live, in graph order.

    Uses by ``output`` never keep a value live; with ``relax``, neither do uses by
    collectors, so models that stack every hidden state still have their per-layer cuts,
    and writes into a collector buffer (``solution[j] = y``, ``passes/collector_writes.py``)
    are no dependents at all: they belong to no step.
    A relaxed cut can be false (a collector inside a block); candidates that read a value
    from inside their own range are dropped afterwards (``_self_contained``).
    """
    order = list(graph.nodes)
    pos = {n: i for i, n in enumerate(order)}
    dep = dependents(source)
    if relax:
        dep -= collector_writes(dep)
    delta = [0] * (len(order) + 1)
    live_until = {}
    for n in dep:
        last = max((pos[u] for u in n.users if u in dep and not (relax and _collector(u, dep))),  # not output, writes
                   default=pos[n])
        live_until[n] = last
        if last > pos[n]:
            delta[pos[n]] += 1
            delta[last] -= 1
    result, live = [], 0
    for i, n in enumerate(order):
        live += delta[i]
        if n in dep and live - (1 if live_until[n] > i else 0) == 0:
            result.append(n)
    return result, dep


def pieces(graph: fx.Graph, source: fx.Node, gm=None, relax: bool = False) -> list:
    cut_nodes, dep = cuts(graph, source, relax)
    order = list(graph.nodes)
    pos = {n: i for i, n in enumerate(order)}
    out, modules = [], {}
    for a, b in zip(cut_nodes, cut_nodes[1:]):
        nodes = [n for n in order[pos[a] + 1:pos[b] + 1] if n in dep]
        piece = _Piece(a, b, nodes)
        piece.form = canonical(a, nodes, True, gm, modules)
        piece.loose, piece.strict = piece.form.loose, piece.form.strict
        out.append(piece)
    return out


# --- runs --------------------------------------------------------------------------------
def periodic_runs(keys: list, min_count: int = 2) -> list[tuple[int, int, int]]:
    """Non-overlapping ``(start, period, count)`` runs, biggest coverage first."""
    ids: dict = {}
    k = [ids.setdefault(x, len(ids)) for x in keys]
    n = len(k)
    found = []
    for p in _candidate_periods(k, n // min_count):
        i = 0
        while i + p < n:
            if k[i] != k[i + p]:
                i += 1
                continue
            j = i
            while j + p < n and k[j] == k[j + p]:
                j += 1
            count = (j + p - i) // p
            if count >= min_count:
                found.append((count * p, p, i, count))
            i = j + 1
    found.sort(key=lambda r: (-r[0], r[1], r[2]))
    taken = [False] * n
    runs = []
    for cover, p, start, count in found:
        if any(taken[start:start + cover]):
            continue
        for i in range(start, start + cover):
            taken[i] = True
        runs.append((start, p, count))
    return sorted(runs)


ALWAYS_TRIED_PERIODS = 16


def _candidate_periods(k: list, max_period: int) -> list:
    """Periods worth scanning: every p <= 16, and every distance from a key to its next occurrence.

    A run of period p repeats each key p apart, so unless every key of the period occurs
    twice within it, some key's next occurrence is exactly p away. Scanning only these
    keeps the search O(n * periods) instead of O(n^2) for chains of thousands of layers.
    """
    last: dict = {}
    periods = set(range(1, min(ALWAYS_TRIED_PERIODS, max_period) + 1))
    for i, key in enumerate(k):
        if key in last and i - last[key] <= max_period:
            periods.add(i - last[key])
        last[key] = i
    return sorted(periods)


def _segments(ps: list, start: int, period: int, count: int, gm) -> list:
    segs = []
    for s in range(count):
        chunk = ps[start + s * period:start + (s + 1) * period]
        nodes = [n for c in chunk for n in c.nodes]
        if period == 1:  # the piece's own form has the slots
            externals, floats = list(chunk[0].form.externals), list(chunk[0].form.floats)
        else:
            externals, floats = _slots(chunk[0].state_in, nodes)
        segs.append(Segment(chunk[0].state_in, chunk[-1].state_out, nodes, externals, floats))
    return segs


def _self_contained(c: Candidate, order: dict) -> bool:
    """No segment reads a state-dependent value computed inside the chain by another segment."""
    start = min(order[n] for n in c.segments[0].ins)
    chain = set(c.nodes) | set(c.segments[0].ins)  # once: a copy per external made this O(L^2)
    for seg in c.segments:
        for x in seg.externals:
            if order[x] > start and _depends_on(x, chain, start, order):
                return False
    return True


def _depends_on(x: fx.Node, chain: set, start: int, order: dict) -> bool:
    """Whether ``x`` (a node inside the chain's range) is computed from chain values."""
    stack, seen = [x], set()
    while stack:
        n = stack.pop()
        if n in chain:
            return True
        for a in n.all_input_nodes:
            if a not in seen and order[a] >= start:
                seen.add(a)
                stack.append(a)
    return False


def find_chains(gm: fx.GraphModule, sources: Optional[Iterable[fx.Node]] = None) -> list[Candidate]:
    """Every repeated run of >= 2 segments, from all sources, without overlap: single-tensor states
    (cuts at bottlenecks, below), then states of several tensors (``passes/find_states.py``) where the
    single-tensor chains leave a source's path mostly uncovered."""
    from .find_states import multi_state_candidates  # it builds on this module's forms and runs

    graph = gm.graph
    sources = default_sources(graph) if sources is None else list(sources)
    candidates = []
    for source, relax in ((s, r) for s in sources for r in (False, True)):
        if relax:
            if not relaxable(dependents(source)):
                continue
        ps = pieces(graph, source, gm, relax)
        for start, p, count in periodic_runs([x.loose for x in ps]):
            run = ps[start:start + p * count]
            strict = periodic_runs([x.strict for x in run])
            strict = [r for r in strict if r[2] >= 2]
            if not strict:
                candidates.append(Candidate(source, p, _segments(run, 0, p, count, gm), shapes_differ=True))
            for s_start, s_p, s_count in strict:
                candidates.append(Candidate(source, s_p, _segments(run, s_start, s_p, s_count, gm)))
    order = {n: i for i, n in enumerate(graph.nodes)}
    candidates = [c for c in candidates if _self_contained(c, order)]
    candidates += [c for c in multi_state_candidates(gm, sources, candidates) if _self_contained(c, order)]
    # most nodes covered first; on a tie the state of fewer tensors (a single-tensor chain) wins
    candidates.sort(key=lambda c: (-len(c.nodes), c.components))
    chosen, used = [], set()
    for c in candidates:
        if used.isdisjoint(c.nodes):
            chosen.append(c)
            used.update(c.nodes)
    return sorted(chosen, key=lambda c: min(order[n] for n in c.segments[0].ins))
