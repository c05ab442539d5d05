"""Readable names around a new ``PCRSolve`` call in the emitted graph.

``first_a_weight_per_step`` for a stack of the steps' weights, ``pcr_solve_0_coef0`` for
per-step constants, ``pcr_solve_0_out8`` for state 8. Names only: the graph computes the
same thing before and after.
"""
from __future__ import annotations

import operator
import re

import torch
import torch.fx as fx

from ..runtime.stacked import StackedAttributes


def free_name(gm: fx.GraphModule, base: str) -> str:
    """``base_0``, ``base_1``, ...: the first that is not an attribute of ``gm``."""
    i = 0
    while hasattr(gm, f"{base}_{i}"):
        i += 1
    return f"{base}_{i}"


def tidy_names(gm: fx.GraphModule, name: str, replaced: dict) -> None:
    """Rename the inputs and outputs of the ``PCRSolve`` call ``name``; ``replaced`` (erased node ->
    replacement, see ``rewrite.rewrite``) is updated so later chains find the renamed nodes."""
    graph = gm.graph
    solve = next(n for n in graph.nodes if n.op == "call_module" and n.target == name)
    coef = 0
    for arg in solve.args[1:]:
        if isinstance(arg, fx.Node) and arg.op == "call_function" and arg.target is torch.stack:
            items = arg.args[0]
            _renamed(graph, arg, f"{_common_name(items[0].name, items[-1].name)}_per_step")
        elif isinstance(arg, fx.Node) and arg.op == "call_module" and \
                isinstance(gm.get_submodule(arg.target), StackedAttributes):
            targets = gm.get_submodule(arg.target).targets
            first, last = (t.replace(".", "_") for t in (targets[0], targets[-1]))
            _renamed(graph, arg, f"{_common_name(first, last)}_per_step")
        elif isinstance(arg, fx.Node) and arg.op == "call_function" and arg.target is torch.tensor:
            _renamed(graph, arg, f"{name}_coef{coef}")
            coef += 1
    renamed = {}
    for user in list(solve.users):
        if user.op == "call_function" and user.target is operator.getitem:
            renamed[user] = _renamed(graph, user, f"{name}_out{user.args[1]}")
    for old, new in replaced.items():  # later chains may start from these states
        replaced[old] = renamed.get(new, new)


def _common_name(first: str, last: str) -> str:
    """``first_0_a_weight``, ``first_8_a_weight`` -> ``first_a_weight`` (the parts every step shares)."""
    a, b = first.split("_"), last.split("_")
    parts = [x for x, y in zip(a, b) if x == y] if len(a) == len(b) else a
    return "_".join(p for p in parts if p) or "input"


def _renamed(graph: fx.Graph, node: fx.Node, name: str) -> fx.Node:
    with graph.inserting_after(node):
        new = graph.create_node(node.op, node.target, node.args, node.kwargs, name=re.sub(r"\W", "_", name))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new
