"""The pass pipeline: an explicit ordered list of passes over one captured graph.

Each pass is ``pass_(gm, ctx) -> PassResult(graph_module, modified)``; ``ctx`` carries
the options, the example inputs and what earlier passes learned (shapes, candidates,
decisions), and collects the ``CompileReport``'s chain records. A failing pass is
re-raised as ``PassError`` naming the passes that already ran.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.fx as fx

from ..config import Config
from ..inspect.report import REFUSED, REWRITTEN, ChainRecord, CompileReport
from ..runtime import jacobians
from .find_chains import Candidate, find_chains
from .rewrite import covered_modules, rewrite, slots_of
from .shape_prop import ShapeInfo, info_of, propagate
from .validate import Refusal, validate

logger = logging.getLogger(__name__)


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool


class PassError(RuntimeError):
    pass


@dataclass
class Context:
    config: Config
    example_inputs: tuple
    report: CompileReport
    front_end: str = "symbolic"
    graph_index: int = 0
    sources: Optional[list] = None  # placeholders a chain may start from (None: every float tensor input)
    shapes: Optional[ShapeInfo] = None
    candidates: list = field(default_factory=list)
    decisions: list = field(default_factory=list)  # (Candidate, Optional[Refusal]) per candidate

    @property
    def device_type(self) -> str:
        devices = [x.device.type for x in self.example_inputs if isinstance(x, torch.Tensor)]
        return "cuda" if "cuda" in devices else (devices[0] if devices else "cpu")


def shape_prop_pass(gm: fx.GraphModule, ctx: Context) -> PassResult:
    ctx.shapes = propagate(gm, ctx.example_inputs)
    return PassResult(gm, False)


def find_chains_pass(gm: fx.GraphModule, ctx: Context) -> PassResult:
    sources = None if ctx.sources is None else [s for s in ctx.sources
                                                if info_of(s) is not None and info_of(s).is_tensor
                                                and info_of(s).dtype.is_floating_point]
    ctx.candidates = find_chains(gm, sources)
    return PassResult(gm, False)


def validate_pass(gm: fx.GraphModule, ctx: Context) -> PassResult:
    ctx.decisions = [(c, validate(c, gm, ctx.shapes, ctx.config, ctx.device_type)) for c in ctx.candidates]
    return PassResult(gm, False)


def rewrite_pass(gm: fx.GraphModule, ctx: Context) -> PassResult:
    modified, replaced = False, {}
    for c, refusal in ctx.decisions:
        record = _record(c, refusal, ctx)
        if refusal is None:
            name = _free_name(gm, "pcr_solve")
            rewrite(gm, c, ctx.config, name, replaced)
            record.submodule, modified = name, True
            logger.debug("deeppcr: chain %s (L=%d, p=%d) -> %s", c.segments[0].state_in.name, c.length, c.period, name)
        else:
            logger.debug("deeppcr: chain at %s refused: %s", c.segments[0].state_in.name, refusal)
        ctx.report.chains.append(record)
    return PassResult(gm, modified)


def recompile_pass(gm: fx.GraphModule, ctx: Context) -> PassResult:
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, False)


PIPELINE: tuple[Callable, ...] = (shape_prop_pass, find_chains_pass, validate_pass, rewrite_pass, recompile_pass)


def run_pipeline(gm: fx.GraphModule, ctx: Context, passes=PIPELINE) -> PassResult:
    ran, modified = [], False
    for p in passes:
        try:
            result = p(gm, ctx)
        except Exception as exc:
            raise PassError(f"deeppcr pass {p.__name__} failed (after {[r for r in ran]}): "
                            f"{type(exc).__name__}: {exc}") from exc
        gm, modified = result.graph_module, modified or result.modified
        ran.append(p.__name__)
    return PassResult(gm, modified)


def _record(c: Candidate, refusal: Optional[Refusal], ctx: Context) -> ChainRecord:
    info = info_of(c.segments[0].state_in)
    shape = info.shape if info is not None and info.is_tensor else None
    width = math.prod(shape[1:] if len(shape) >= 2 else shape) if shape is not None else 0
    mode = jacobians.choose_mode(ctx.config.jacobian, width, ctx.config.full_max_state)
    slots = slots_of(c) if not c.shapes_differ else None
    return ChainRecord(
        index=len(ctx.report.chains), front_end=ctx.front_end, graph=ctx.graph_index,
        state=c.segments[0].state_in.name, state_shape=shape,
        dtype=str(info.dtype).replace("torch.", "") if shape is not None else "",
        length=c.length, period=c.period, replaced=tuple(n.name for n in c.nodes), covers=covered_modules(c),
        n_per_step=0 if slots is None else len(slots.per_step_ext) + len(slots.per_step_float),
        n_shared=0 if slots is None else len(slots.shared_ext), jacobian=mode,
        status=REWRITTEN if refusal is None else REFUSED,
        reason=None if refusal is None else refusal.reason, detail="" if refusal is None else refusal.detail)


def _free_name(gm: fx.GraphModule, base: str) -> str:
    i = 0
    while hasattr(gm, f"{base}_{i}"):
        i += 1
    return f"{base}_{i}"
