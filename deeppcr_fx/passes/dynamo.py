"""Front end 2: the pass as a TorchDynamo backend.

TorchDynamo follows Python that symbolic tracing cannot (a diffusers scheduler's
``step`` with its ``step_index`` bookkeeping, Python-int timesteps), unrolls the loop
and hands over one graph per captured region. Parameters usually arrive as graph
inputs (placeholders); a chain may start from the other inputs' floating tensors and from
the first floating tensors computed from them (``passes/sources.py``: an embedding of token
ids). Values a chain's steps hand to the caller (a KV cache in the output) are recomputed
after the chain (``passes/escapes.py``). Random
draws whose shape is static do not depend on the state, so they stay in the graph in
their original order and the rewritten graph draws exactly the same numbers.

``make_backend(config, reports)`` returns a backend ``(gm, example_inputs) -> callable``
that appends one ``CompileReport`` per graph to ``reports``.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
import torch.fx as fx

from ..config import Config
from ..inspect.report import CompileReport
from .escapes import recompute_escapes
from .options import CompileOptions
from .pipeline import run_pipeline
from .shape_prop import propagate
from .shape_reads import constant_shape_reads, home_device
from .sources import default_sources

logger = logging.getLogger(__name__)


def _describe_inputs(example_inputs) -> str:
    return ", ".join(f"{str(x.dtype).replace('torch.', '')}{list(x.shape)}" if isinstance(x, torch.Tensor)
                     else repr(x) for x in example_inputs if not isinstance(x, torch.nn.Parameter))


class DynamoBackend:
    """A TorchDynamo backend running the deeppcr pipeline on every graph it receives."""

    def __init__(self, config: Config, reports: Optional[list] = None, model_name: str = "dynamo graph",
                 model: Optional[torch.nn.Module] = None) -> None:
        self.config = config
        # the model's own tensors arrive as graph inputs too: they are not the caller's inputs
        self._state = set() if model is None else {id(t) for t in list(model.parameters()) + list(model.buffers())}
        self.reports = [] if reports is None else reports
        self.model_name = model_name
        self.graph_modules: list = []

    def __call__(self, gm: fx.GraphModule, example_inputs) -> Callable:
        report = CompileReport(model=self.model_name, policy=self.config.policy,
                               signature=_describe_inputs(example_inputs), front_end="dynamo", captured=1)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        inputs = [n for n, x in zip(placeholders, example_inputs) if isinstance(x, torch.Tensor)
                  and not isinstance(x, torch.nn.Parameter) and id(x) not in self._state]
        propagate(gm, tuple(example_inputs))
        if constant_shape_reads(gm, home_device(example_inputs)):
            propagate(gm, tuple(example_inputs))
        sources = default_sources(gm.graph, inputs)
        report.notes.extend(recompute_escapes(gm, tuple(example_inputs), sources, shapes_known=True))
        options = CompileOptions(self.config, tuple(example_inputs), front_end="dynamo",
                                 graph_index=len(self.graph_modules), sources=tuple(sources))
        result = run_pipeline(gm, options, report)
        self.graph_modules.append(result.graph_module)
        self.reports.append(report)
        if len(self.graph_modules) > 1:
            report.notes.append(f"TorchDynamo handed over {len(self.graph_modules)} graphs so far (graph breaks or "
                                "recompilations); chains cannot cross a graph break")
        return result.graph_module


def make_backend(config: Optional[Config] = None, reports: Optional[list] = None, **options) -> DynamoBackend:
    config = (config or Config()).replace(**options) if options else (config or Config())
    return DynamoBackend(config, reports)
