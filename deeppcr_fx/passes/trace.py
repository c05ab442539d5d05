"""Front end 1: symbolic tracing that inlines every module, leaf modules included.

``trace(model)`` returns a functional ``torch.fx.GraphModule``: an ``nn.Linear`` becomes
``linear(x, get_attr weight, get_attr bias)``, so a block's parameters appear as
``get_attr`` nodes that the chain finder can turn into per-step slots.

A submodule whose ``forward`` cannot be traced symbolically (it branches on a tensor
value or shape, calls untraceable Python, ...) is rolled back and kept as one opaque
``call_module`` node; ``TraceResult.opaque`` says which and why. Its parameters can
still become per-step slots (``torch.func.functional_call`` on stacked parameters).

If the root ``forward`` itself cannot be traced, ``trace`` raises ``TraceFailure``
with the reason; the caller then tries another front end or runs the model as is.
"""
from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field

import torch
import torch.fx as fx

logger = logging.getLogger(__name__)


class TraceFailure(RuntimeError):
    """The model's own ``forward`` cannot be traced symbolically."""


@dataclass
class TraceResult:
    graph_module: fx.GraphModule
    opaque: dict = field(default_factory=dict)  # module path -> why its forward stayed opaque


class InliningTracer(fx.Tracer):
    """An ``fx.Tracer`` that traces through every module; untraceable ones become opaque calls."""

    def __init__(self) -> None:
        super().__init__()
        self.opaque: dict[str, str] = {}
        self._proxy_caches: list[dict] = []

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.opaque

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if not any(c is parameter_proxy_cache for c in self._proxy_caches):
            self._proxy_caches.append(parameter_proxy_cache)
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        if path in self.opaque or not path:
            return super().call_module(m, forward, args, kwargs)
        last = self.graph._root.prev  # the newest node before this call
        stack = collections.OrderedDict(self.module_stack)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:  # this module's forward cannot be traced: keep it opaque
            self.module_stack.clear()
            self.module_stack.update(stack)
            self._rollback(last)
            self.opaque[path] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            logger.debug("deeppcr trace: %s (%s) stays opaque: %s", path, type(m).__name__, self.opaque[path])
            return super().call_module(m, forward, args, kwargs)

    def _rollback(self, last: fx.Node) -> None:
        """Erase every node created after ``last`` (newest first) and forget their cached proxies."""
        doomed = []
        node = self.graph._root.prev
        while node is not last:
            doomed.append(node)
            node = node.prev
        erased = set(doomed)
        for node in doomed:
            self.graph.erase_node(node)
        for cache in self._proxy_caches:
            for name in [k for k, p in cache.items() if p.node in erased]:
                del cache[name]


def trace(model: torch.nn.Module) -> TraceResult:
    """Trace ``model`` into a functional GraphModule that shares the model's Parameters."""
    tracer = InliningTracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        raise TraceFailure(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    gm = fx.GraphModule(tracer.root, graph, model.__class__.__name__)
    gm.graph.lint()
    return TraceResult(gm, dict(tracer.opaque))
