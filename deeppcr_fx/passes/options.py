"""``CompileOptions``: what one run of the pass pipeline is given, frozen.

The passes read their inputs from here and write what they learn on the graph
(``node.meta``, ``gm.meta``; see ``passes/plan.py``), never back into the options.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch
import torch.fx as fx

from ..config import Config


@dataclass(frozen=True)
class CompileOptions:
    """Arguments:
        config: the user's options.
        example_inputs: the inputs of the captured graph's placeholders, in order.
        front_end: which front end captured the graph ("symbolic", "record" or "dynamo").
        graph_index: which captured graph this is (TorchDynamo may hand over several).
        sources: the placeholders a chain may start from (None: every floating tensor input).
        forced: chain index -> ``(parallel, why)``: choices measured by autotuning, which the
            ``decide`` pass applies instead of the policy.
        backward: whether a backward pass is expected (grad mode on and something requires grad);
            ``with_backward`` fills it in from a graph.
        autocast: whether ``torch.autocast`` is on for the inputs' device (chains then stay sequential).
    """

    config: Config
    example_inputs: tuple
    front_end: str = "symbolic"
    graph_index: int = 0
    sources: Optional[tuple] = None
    forced: Mapping = field(default_factory=dict)
    backward: bool = False
    autocast: bool = False

    def replace(self, **changes) -> "CompileOptions":
        return dataclasses.replace(self, **changes)

    def with_backward(self, gm: fx.GraphModule) -> "CompileOptions":
        """These options with ``backward`` set: grad mode is on and an input or a Parameter requires grad."""
        if not torch.is_grad_enabled():
            return self.replace(backward=False)
        tensors = [x for x in self.example_inputs if isinstance(x, torch.Tensor)]
        wants = any(t.requires_grad for t in tensors) or any(p.requires_grad for p in gm.parameters())
        return self.replace(backward=wants)

    @property
    def device_type(self) -> str:
        devices = [x.device.type for x in self.example_inputs if isinstance(x, torch.Tensor)]
        return "cuda" if "cuda" in devices else (devices[0] if devices else "cpu")

    @property
    def device_index(self) -> Optional[int]:
        for x in self.example_inputs:
            if isinstance(x, torch.Tensor) and x.device.type == self.device_type:
                return x.device.index
        return None
