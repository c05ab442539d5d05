"""``deeppcr.draw``: the graph before and after the rewrite, drawn with torch.fx's ``FxGraphDrawer``.

Needs pydot (``pip install 'deeppcr_fx[viz]'``), and the Graphviz ``dot`` program for
``.svg`` / ``.png`` / ``.pdf``; a ``.dot`` file is written by pydot alone. One file holds
two clusters, "before" (the captured graph) and "after" (the emitted graph); ``PCRSolve``
nodes are labelled with L, the Jacobian mode and the modules they cover.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Union

import torch.fx as fx

from .._optional import require
from ..results import MissingDependency

FORMATS = {".svg": "svg", ".png": "png", ".pdf": "pdf", ".dot": "raw", ".gv": "raw"}


def check_drawable(path: Union[str, Path]) -> str:
    """The output format for ``path``; raises ``ValueError`` / ``MissingDependency`` before any work."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"deeppcr.draw: cannot write {str(path)!r}: use one of {', '.join(FORMATS)}")
    require("pydot", "viz", "deeppcr.draw")
    fmt = FORMATS[suffix]
    if fmt != "raw" and shutil.which("dot") is None:
        raise MissingDependency(f"deeppcr.draw: writing {suffix} needs the Graphviz 'dot' program (e.g. apt install "
                                "graphviz, brew install graphviz or conda install graphviz); a .dot file needs "
                                "only pydot")
    return fmt


def _graphs(obj) -> list:
    """``[(label, GraphModule)]`` to draw for a CompiledModule, a CompileReport or a GraphModule."""
    if isinstance(obj, fx.GraphModule):
        return [("graph", obj)]
    report = getattr(obj, "report", obj)
    graphs = getattr(report, "graphs", None)
    if report is None or not graphs:
        raise ValueError("deeppcr.draw: nothing to draw yet: call the compiled module (or deeppcr.explain) first")
    if any(g is None for g in graphs.values()):
        raise ValueError("deeppcr.draw: this report was read back from a dict and holds no graphs")
    before, after = graphs["capture"], list(graphs.values())[-1]
    return [("before", before)] if after is before else [("before", before), ("after", after)]


def _escape(text: str) -> str:
    for ch in "\\{}|<>":
        text = text.replace(ch, "\\" + ch)
    return text


def _cluster(pydot, drawer_cls, label: str, gm: fx.GraphModule, options: dict):
    from ..runtime.pcr_solve import PCRSolve

    dot = drawer_cls(gm, label, **options).get_main_dot_graph()
    cluster = pydot.Cluster(label, label=label)
    solves = {n.name: gm.get_submodule(n.target) for n in gm.graph.nodes
              if n.op == "call_module" and isinstance(gm.get_submodule(n.target), PCRSolve)}
    for node in dot.get_nodes():
        name = node.get_name().strip('"')
        attrs = dict(node.get_attributes())
        if name in solves:
            m = solves[name]
            attrs["label"] = "{" + _escape(f"{name}: PCRSolve") + "|" + _escape(
                f"L={m.length}, period={m.period}, mode={m.mode}") + "|" + _escape(f"covers {m.describe()}") + "}"
            attrs["fillcolor"] = "gold"
        cluster.add_node(pydot.Node(f"{label}_{name}", **attrs))
    for edge in dot.get_edges():
        src, dst = (str(x).strip('"') for x in (edge.get_source(), edge.get_destination()))
        cluster.add_edge(pydot.Edge(f"{label}_{src}", f"{label}_{dst}"))
    return cluster


def draw(obj, path: Union[str, Path], ignore_getattr: bool = True, **drawer_options) -> str:
    """Draw ``obj`` (a compiled module, a ``CompileReport`` or a GraphModule) to ``path``.

    The format follows the suffix (``.svg``, ``.png``, ``.pdf``, ``.dot``). ``ignore_getattr``
    leaves parameter reads out (they clutter deep models); other keyword options go to
    ``torch.fx.passes.graph_drawer.FxGraphDrawer``. Returns the path written.
    """
    fmt = check_drawable(path)
    graphs = _graphs(obj)
    pydot = require("pydot", "viz", "deeppcr.draw")
    from torch.fx.passes.graph_drawer import FxGraphDrawer

    options = dict(drawer_options, ignore_getattr=ignore_getattr)
    dot = pydot.Dot("deeppcr", graph_type="digraph", rankdir="TB")
    for label, gm in graphs:
        dot.add_subgraph(_cluster(pydot, FxGraphDrawer, label, gm, options))
    dot.write(str(path), format=fmt)
    return str(path)
