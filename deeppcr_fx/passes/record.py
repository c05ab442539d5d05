"""Front end 3: record one concrete run (what the Python did, as a graph of tensor ops).

Symbolic tracing cannot follow a diffusers scheduler (it indexes tensors with Python
ints, keeps ``step_index`` on ``self``, calls ``.item()``), and TorchDynamo may break its
graph there. Recording runs the model once on the real inputs under a
``TorchFunctionMode`` and writes every torch call that returns tensors into an FX graph:

- inputs become placeholders, the model's Parameters and buffers ``get_attr`` nodes
  (the very same objects, so gradients reach them), other tensors constants;
- random and factory calls (``torch.randn``) are recorded even without tensor inputs,
  so the graph draws fresh numbers, in the original order, on every call (from the
  user's own ``torch.Generator`` object when one is passed);
- Python values read from tensors (``.item()``, ``bool``, shapes) are baked in. That is
  only sound when they do not depend on the inputs: reading an input-dependent value
  (data-dependent control flow) makes recording fail with that reason.

Work that reads only a tensor's shape, dtype and device (``zeros_like(h)``, ``h.new_ones(...)``)
is recorded as the factory call it amounts to (``zeros(shape, dtype=, device=)``), which reads
no tensor: it does not depend on the state, so a chain finder hoists it (not on an input itself,
nor with a float fill value: ``passes/shape_reads.py`` says why). A concatenation with
legacy 1-D empty tensors (``cat([torch.tensor([]), k])``, how a transformers ``DynamicCache``
starts) is recorded without them: the same value, and vmap can batch it.

Inputs may be positional or keyword; tensors become placeholders (``Inputs``), other values
(``None``, flags) are baked in. The output may be any pytree, with objects torch's pytree does
not know inside it (a ``DynamicCache``): the graph returns the output's tensors and
``gm.meta[OUTPUT_SPEC]`` (an ``Outputs``) rebuilds the model's output from them.

The graph is specialised to the recorded run: the same loop length, the same Python
decisions. Python-side effects (a scheduler's step counter) happen during recording
only; models whose forward resets such state at its start (as samplers do) replay
exactly.
"""
from __future__ import annotations

import logging
import operator
from typing import Any

import torch
import torch.fx as fx
from torch.overrides import TorchFunctionMode

from ..results import RecordFailure
from .live import share_children
from .pytrees import Inputs, Outputs

logger = logging.getLogger(__name__)


_CONCRETE_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
                   torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.numpy}
_DATA_DEPENDENT_SHAPES = {torch.nonzero, torch.Tensor.nonzero, torch.masked_select, torch.Tensor.masked_select,
                          torch.unique, torch.argwhere}
_SKIP = {torch.Tensor.__repr__, torch.Tensor.__format__, torch.Tensor.__str__}
# ops whose result depends only on their tensor argument's shape, dtype and device: -> the factory, and
# where its fill value sits (None: no fill value)
_LIKE = {torch.zeros_like: (torch.zeros, None), torch.ones_like: (torch.ones, None),
         torch.empty_like: (torch.empty, None), torch.full_like: (torch.full, 1),
         torch.Tensor.new_zeros: (torch.zeros, None), torch.Tensor.new_ones: (torch.ones, None),
         torch.Tensor.new_empty: (torch.empty, None), torch.Tensor.new_full: (torch.full, 2)}


def _method_names() -> dict:
    names = {}
    for name in dir(torch.Tensor):
        try:
            attr = getattr(torch.Tensor, name)
        except Exception:
            continue
        if callable(attr):
            names.setdefault(id(attr), (attr, name))
    return names


_METHODS = _method_names()


def _emit(graph: fx.Graph, func, args: tuple, kwargs: dict) -> fx.Node:
    """A node FX can print as code: Tensor methods as ``call_method``, properties via ``getattr``."""
    hit = _METHODS.get(id(func))
    if hit is not None and hit[0] is func and not hasattr(torch, hit[1]) or (hit and hit[1].startswith("__")):
        return graph.call_method(hit[1], args, kwargs)
    if getattr(func, "__name__", "") == "__get__" and hasattr(func, "__self__"):
        return graph.call_function(getattr, (args[0], func.__self__.__name__))
    return graph.call_function(func, args, kwargs)


def _tensors(x: Any):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (tuple, list)):
        for v in x:
            yield from _tensors(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)


class _Recorder(TorchFunctionMode):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.graph = fx.Graph()
        self.nodes: dict[int, tuple] = {}  # id(tensor) -> (tensor, node); tensors kept alive while recording
        self.dependent: set = set()  # nodes computed from the inputs
        self.attrs: dict[str, Any] = {}
        self.named = {id(t): name for name, t in list(model.named_parameters()) + list(model.named_buffers())}
        self.error: str | None = None
        self.module_stack: list = []  # (path, type) of the modules whose forward is running

    def placeholder(self, t: torch.Tensor, name: str) -> None:
        node = self.graph.placeholder(name)
        self.nodes[id(t)] = (t, node)
        self.dependent.add(node)

    def node_for(self, t: torch.Tensor) -> fx.Node:
        hit = self.nodes.get(id(t))
        if hit is not None and hit[0] is t:
            return hit[1]
        name = self.named.get(id(t))
        if name is None:
            name = f"_recorded_constant_{len(self.attrs)}"
        self.attrs[name] = t
        node = self.graph.get_attr(name)
        self.nodes[id(t)] = (t, node)
        return node

    def _arg(self, a: Any) -> Any:
        if isinstance(a, torch.Tensor):
            return self.node_for(a)
        if isinstance(a, (tuple, list)):
            return type(a)(self._arg(v) for v in a)
        if isinstance(a, dict):
            return {k: self._arg(v) for k, v in a.items()}
        if isinstance(a, torch.Generator):  # the very generator object: replays continue its stream
            hit = self.nodes.get(id(a))
            if hit is None:
                name = f"_recorded_generator_{len(self.attrs)}"
                self.attrs[name] = a
                hit = self.nodes[id(a)] = (a, self.graph.get_attr(name))
            return hit[1]
        return a

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _SKIP or self.error is not None:
            return out
        inputs = list(_tensors((args, kwargs)))
        known = [self.nodes[id(t)][1] for t in inputs if id(t) in self.nodes and self.nodes[id(t)][0] is t]
        dependent = any(n in self.dependent for n in known)
        if func in _CONCRETE_READS or func in _DATA_DEPENDENT_SHAPES:
            if dependent:
                self.error = (f"{getattr(func, '__qualname__', func)} reads a value computed from the inputs "
                              "(data-dependent control flow)")
            if func in _CONCRETE_READS:
                return out
        if func is torch.Tensor.__setitem__:  # in place, returns None: replayed as a node in order
            try:
                node = self.graph.call_function(operator.setitem, self._arg(tuple(args)))
            except RecordFailure as exc:
                self.error = str(exc)
                return out
            if dependent:
                self.dependent.add(node)
            return out
        if not list(_tensors(out)):
            return out
        if func in _LIKE and isinstance(out, torch.Tensor) and not self._of_input(args):
            factory = self._factory(func, out, args, kwargs)
            if factory is not None:
                self.nodes[id(out)] = (out, factory)
                return out
        if func in (torch.cat, torch.concat, torch.concatenate) and args and isinstance(args[0], (list, tuple)):
            args = (_without_legacy_empty(args[0]),) + tuple(args[1:])
        try:
            node = _emit(self.graph, func, self._arg(tuple(args)), self._arg(dict(kwargs)))
        except RecordFailure as exc:
            self.error = str(exc)
            return out
        if dependent:
            self.dependent.add(node)
        if self.module_stack:
            node.meta["nn_module_stack"] = {path: (path, kind) for path, kind in self.module_stack}
        if isinstance(out, torch.Tensor):
            self.nodes[id(out)] = (out, node)
        elif isinstance(out, (tuple, list)):
            for i, t in enumerate(out):
                if isinstance(t, torch.Tensor):
                    item = self.graph.call_function(operator.getitem, (node, i))
                    if dependent:
                        self.dependent.add(item)
                    self.nodes[id(t)] = (t, item)
        return out


    def _of_input(self, args: tuple) -> bool:
        """The op reads an input itself (``v = zeros_like(x)``: runs once, stays paired with ``x``)."""
        hit = self.nodes.get(id(args[0])) if args and isinstance(args[0], torch.Tensor) else None
        return hit is not None and hit[0] is args[0] and hit[1].op == "placeholder"

    def _factory(self, func, out: torch.Tensor, args: tuple, kwargs: dict):
        """``zeros_like(h)`` as ``zeros(h.shape, dtype=, device=)``: a node that reads no tensor (None when
        the fill value is itself a tensor)."""
        factory, fill_at = _LIKE[func]
        extra = {"dtype": out.dtype, "device": out.device}
        if out.requires_grad and kwargs.get("requires_grad"):
            extra["requires_grad"] = True
        if fill_at is None:
            return self.graph.call_function(factory, (tuple(out.shape),), extra)
        fill = args[fill_at] if len(args) > fill_at else kwargs.get("fill_value")
        if isinstance(fill, (torch.Tensor, float)) or fill is None:  # a float may differ per step: a coefficient
            return None
        return self.graph.call_function(factory, (tuple(out.shape), fill), extra)


def _without_legacy_empty(tensors):
    """``cat``'s legacy rule skips 1-D empty tensors among higher-dimensional ones: drop them explicitly."""
    kept = [t for t in tensors if not (isinstance(t, torch.Tensor) and t.dim() == 1 and t.numel() == 0)]
    if kept and len(kept) < len(tensors) and all(isinstance(t, torch.Tensor) for t in kept):
        return type(tensors)(kept) if isinstance(tensors, (list, tuple)) else kept
    return tensors


OUTPUT_SPEC = "deeppcr_output_spec"
INPUTS = "deeppcr_inputs"


def record(model: torch.nn.Module, example_inputs: tuple, example_kwargs: "dict | None" = None
           ) -> tuple[fx.GraphModule, Any]:
    """Run ``model(*example_inputs, **example_kwargs)`` once; return the recorded GraphModule and the output.

    The graph's inputs are the call's tensors (``Inputs.of(args, kwargs)``: positional, then keyword);
    other arguments are baked in. It returns the output's tensors; ``gm.meta[OUTPUT_SPEC]`` (an
    ``Outputs``) rebuilds the model's output from them."""
    kwargs = dict(example_kwargs or {})
    rec = _Recorder(model)
    for i, x in enumerate(example_inputs):
        if not isinstance(x, torch.Tensor) and not isinstance(x, (bool, int, float, str, type(None))):
            raise RecordFailure(f"input {i} is a {type(x).__name__}; recording takes tensors and plain values")
    for k, x in kwargs.items():
        if not isinstance(x, torch.Tensor) and not isinstance(x, (bool, int, float, str, type(None))):
            raise RecordFailure(f"input {k}= is a {type(x).__name__}; recording takes tensors and plain values")
    inputs = Inputs.of(tuple(example_inputs), kwargs)
    for x, label in zip(inputs.tensors(tuple(example_inputs), kwargs), inputs.labels()):
        rec.placeholder(x, label)
    handles = []  # temporary hooks that tell which module each op comes from (removed below)
    for path, mod in model.named_modules():
        if path:
            handles.append(mod.register_forward_pre_hook(
                lambda m, a, path=path: rec.module_stack.append((path, type(m)))))
            handles.append(mod.register_forward_hook(lambda m, a, o: rec.module_stack.pop() and None))
    try:
        with rec:
            out = model(*example_inputs, **kwargs)
    finally:
        for h in handles:
            h.remove()
    if rec.error is not None:
        raise RecordFailure(rec.error)
    outputs = Outputs(out)  # any pytree, with objects such as a DynamicCache inside (RecordFailure if not)
    nodes = tuple(rec.node_for(t) for t in outputs.tensors)
    rec.graph.output(nodes[0] if outputs.single else nodes)
    # a dict root maps qualified names to the very objects: the model's Parameters are shared, not copied
    gm = share_children(fx.GraphModule(dict(rec.attrs), rec.graph, type(model).__name__), model)
    gm.graph.lint()
    if not outputs.single:
        gm.meta[OUTPUT_SPEC] = outputs.forget()  # the graph returns the output's tensors; outputs.rebuild(...) the output
    gm.meta[INPUTS] = inputs
    return gm, out
