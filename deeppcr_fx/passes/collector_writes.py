"""Per-step writes into a collector buffer: ``solution[j] = y`` in a loop, as an ODE solver keeps its trajectory.

torchdiffeq's fixed-grid solvers (``odeint(..., method="euler" | "rk4")``) allocate
``solution = torch.empty(len(t), *y0.shape)`` and write ``solution[j] = y1`` after each step. Recorded,
that is one ``setitem(solution, j, y_j)`` per step: an in-place op with a per-step integer, which makes
every step's canonical key differ, and a reader of each state that sits inside the loop. They are the
in-place form of a ``torch.stack(outputs)`` collector, and are handled like one:

- the relaxed search (``find_chains.cuts``, ``find_states._boundaries`` with ``relax``) leaves them out
  of the state's dependents: they neither keep a value live nor belong to a step's nodes (keys);
- ``validate`` checks that each such write reading a chain's state inside the chain can move after the
  chain (``late_writes_problem``); ``rewrite`` moves them there, after the solve's ``getitem``s
  (``move_late_writes``): the same rows receive the same values, from the solved states.

A write is a *collector write* only where moving it is sound: ``setitem(buf, i, v)`` with ``v`` a
dependent value, ``buf`` a tensor made inside forward by a factory (``torch.empty``/``zeros``/...,
never an input, a parameter or a view), every write to ``buf`` a ``setitem`` at a distinct constant
integer row (so their order does not matter), at least 3 of them, and every other use of ``buf``
after its last write (nothing reads the buffer while it is being filled).
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx

from .shape_prop import info_of

_FACTORIES = {torch.empty, torch.zeros, torch.ones, torch.full, torch.empty_like, torch.zeros_like,
              torch.ones_like, torch.full_like}
MIN_WRITES = 3  # as for collectors (find_chains._collector): two writes are no loop


def is_write(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target is operator.setitem) or \
        (n.op == "call_method" and n.target == "__setitem__")


def collector_writes(dep: set) -> set:
    """The collector writes (module docstring) among ``dep`` whose written value is in ``dep``."""
    found: set = set()
    buffers = {n.args[0] for n in dep if is_write(n) and len(n.args) == 3 and isinstance(n.args[0], fx.Node)}
    for buf in buffers:
        writes = _writes(buf)
        if writes is not None:
            found.update(w for w in writes if w.args[2] in dep)
    return found


def _writes(buf: fx.Node) -> Optional[list]:
    """``buf``'s writes when they are all collector writes (module docstring), else None."""
    writes, _ = writes_or_reason(buf)
    return writes


def writes_or_reason(buf: fx.Node) -> tuple:
    """``(writes, "")`` when ``buf``'s writes are all collector writes (module docstring), else
    ``(None, why not)``."""
    if buf.op != "call_function" or buf.target not in _FACTORIES:
        return None, (f"{buf.name} is not a tensor made inside forward by a factory (torch.empty, zeros, ...) "
                      f"in this graph but a {buf.op} node (an input, a parameter, a traced constant or a view)")
    info = info_of(buf)
    if info is None or not info.is_tensor or not info.shape:
        return None, f"the shape of {buf.name} is unknown"
    rows = info.shape[0]
    writes = [u for u in buf.users if is_write(u)]
    rows_written = []
    for w in writes:
        if len(w.args) != 3 or w.kwargs or w.args[0] is not buf or w.users:
            return None, f"{w.name} is not a plain row write into {buf.name}"
        index, value = w.args[1], w.args[2]
        if type(index) is not int or not -rows <= index < rows:
            return None, f"{w.name} writes {buf.name} at {index!r}, not at one constant row"
        if not isinstance(value, fx.Node) or value is buf:
            return None, f"{w.name} does not write a computed value"
        rows_written.append(index % rows)
    if len(writes) < MIN_WRITES or len(set(rows_written)) != len(rows_written):
        return None, f"{buf.name} is written {len(writes)} times, not at {MIN_WRITES} or more distinct rows"
    order = {n: i for i, n in enumerate(buf.graph.nodes)}
    last = max(order[w] for w in writes)
    early = [u.name for u in buf.users if u not in writes and order[u] < last]
    if early:
        return None, f"{buf.name} is read ({', '.join(early[:3])}) before its last write: the loop reads what it wrote"
    return writes, ""


def late_writes(members: set, outs: list, last: fx.Node) -> list:
    """Users of the chain's states ``outs`` (those it computes: members) outside the chain (``members``) placed
    before ``last``, the chain's last node, in graph order: after the rewrite their values come from the solve,
    after ``last``."""
    order = {n: i for i, n in enumerate(last.graph.nodes)}
    found = {u for o in outs for u in o.users if u not in members and order[u] < order[last]}
    return sorted(found, key=order.get)


def late_writes_problem(members: set, outs: list, last: fx.Node) -> Optional[str]:
    """Why the chain's readers placed inside it cannot move after it (None: they can, or there are none)."""
    order = {n: i for i, n in enumerate(last.graph.nodes)}
    for u in late_writes(members, outs, last):
        if not is_write(u) or _writes(u.args[0]) is None:
            return (f"{u.name} ({getattr(u.target, '__name__', u.target)}) reads a step's state inside the chain; "
                    "only row writes into a collector buffer (solution[j] = y) can move after the parallel solve")
        buf = u.args[0]
        between = [r.name for r in buf.users if not is_write(r) and order[u] < order[r] < order[last]]
        if between:
            return f"{buf.name} is read by {between[:3]} while the chain writes it ({u.name})"
    return None


def move_late_writes(graph: fx.Graph, solved: list, anchor: fx.Node) -> None:
    """Move the writes that now read a solved state (the nodes ``solved``) from before it to after
    ``anchor`` (the last node the rewrite added), keeping their order."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    late = sorted({u for new in solved for u in new.users if order[u] < order[new]}, key=order.get)
    for u in late:
        anchor.append(u)
        anchor = u
