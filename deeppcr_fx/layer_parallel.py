"""``deeppcr.compile(model, group=...)``: a model's chain split by depth over the ranks of a process group.

Every rank holds the same model (or the same model built on the meta device) and calls the
compiled module with inputs of the same signature. The compiler traces the model and finds its
longest chain (the usual passes, ``policy="always"``); then each rank runs only its part:

    before the chain     the work that feeds the chain's initial state: on the group's first rank
                         only; work the steps read (conditioning, a shared weight): on every rank
    the chain            this rank's contiguous slice of the steps (``layer_parallel.split``), solved
                         with the other ranks' slices at once (``deeppcr.solve(..., group=)``)
    after the chain      on the group's last rank only, from the final state

``forward`` returns the model's output on the last rank and ``None`` elsewhere; ``backward(loss)``
is called on every rank (the loss on the last, nothing elsewhere), as for ``deeppcr.LayerParallel``.
Gradients reach each rank's own Parameters: its slice of the chain's per-step Parameters, the
first rank's input part, the last rank's head; Parameters every step reads get the sum over ranks.

Memory: only this rank's Parameters are read. Build the model on the meta device and pass
``example_inputs`` to ``compile``: the Parameters this rank needs are then materialised on its
device (``to_empty`` and the owning module's ``reset_parameters()``, as FSDP does) before
``compile`` returns; load weights after that (``load_state_dict`` skips meta tensors), then build
the optimizer from ``compiled.parameters()`` (this rank's Parameters only).

What is refused, with a ``CompileError`` naming the fix: a model with no chain; a chain whose
intermediate states are read outside it (e.g. a list of every layer's output) — only the final
state leaves the chain; a forward with Python side effects (it sets module attributes). The build
is fixed: a call with another input signature, or after a Python value the build read changed
(the same guard as ``deeppcr.compile``), raises instead of re-specialising on some ranks only.
"""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.fx as fx

from .config import Config
from .inspect.report import CompileReport
from .passes.reads import AttributeGuard
from .results import CompileError
from .runtime.distributed_model import RankRole, split
from .runtime.pcr_solve import PCRSolve
from .runtime.solve import solve
from .runtime.stacked import StackedAttributes
from .specialise import Builder


class _RankSolve(torch.nn.Module):
    """This rank's slice of one rewritten chain: ``forward(x0, *per_step_local, *shared) -> local states``."""

    def __init__(self, chain: PCRSolve, group: Any, first: bool, length: int) -> None:
        super().__init__()
        self.step, self.n_per_step, self.config = chain.step, chain.n_per_step, chain.config
        self.group, self.first, self.length = group, first, length  # length: this rank's steps
        self.last_stats = None
        self.last_states = None  # the local states of the last forward, for backward on ranks without the loss

    def forward(self, x0, *inputs):
        res = solve(self.step, x0 if self.first else None, per_step=inputs[:self.n_per_step],
                    shared=inputs[self.n_per_step:], config=self.config, group=self.group, length=self.length)
        self.last_stats, self.last_states = res.stats, res.states
        return res.states


class LayerParallelModule(RankRole, torch.nn.Module):
    """This rank's part of ``model`` with its longest chain split over ``group`` (see the module docstring).

    ``report``: the ``CompileReport`` of the build; ``stats``: the last solve's ``SolveStats`` (the
    same on every rank); ``blocks``: this rank's ``(start, end)`` steps of the chain.
    """

    def __init__(self, model: torch.nn.Module, group: Any, config: Config,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        object.__setattr__(self, "model", model)  # not a submodule: parameters() is this rank's alone
        self.group, self.config = group, config.replace(policy="always")
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.device = device
        self.report: Optional[CompileReport] = None
        self.blocks: Optional[tuple] = None
        self._gm: Optional[fx.GraphModule] = None
        self._signature = None
        self._reads: Optional[AttributeGuard] = None  # the Python values the build read (checked per call)
        self._local: list = []

    @property
    def stats(self):
        return None if self._gm is None else self._gm.get_submodule("rank_solve").last_stats

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        """This rank's Parameters (before the first build: all of the model's)."""
        if self._gm is None:
            yield from self.model.named_parameters(prefix, recurse, remove_duplicate)
            return
        yield from ((prefix + name, p) for name, p in self._local)

    def forward(self, *args):
        if self._gm is None:
            self.build(args)
        elif _signature(args) != self._signature:
            raise CompileError(f"deeppcr.compile(group=...) was built for inputs {self._signature}, called with "
                               f"{_signature(args)}: every rank's slice is fixed at build time; compile again for a "
                               "new input signature.")
        elif self._reads is not None and not self._reads.holds():
            raise CompileError(f"deeppcr.compile(group=...): {', '.join(self._reads.changed())} changed since the "
                               "build, which read it; every rank's part is fixed at build time: compile again.")
        out = self._gm(*args)
        return out if self.is_last else None

    def backward(self, loss: Optional[torch.Tensor] = None) -> None:
        """Backpropagate the last forward on every rank: ``loss`` on the last rank, nothing elsewhere."""
        states = self._gm.get_submodule("rank_solve").last_states if self._gm is not None else None
        if states is None:
            raise RuntimeError("backward() needs a forward() first.")
        self._gm.get_submodule("rank_solve").last_states = None
        self.backward_states(states, loss)

    def build(self, args: tuple) -> None:
        """Trace, find the chain, keep this rank's part of the graph; materialise its meta Parameters."""
        self._signature = _signature(args)
        report = CompileReport(model=type(self.model).__name__, policy="always", signature=str(self._signature))
        spec = Builder(self.model, self.config).symbolic(args, {}, report)  # deeppcr.compile's symbolic front end
        self.report, self._reads = report, spec.reads
        gm = spec.graph_module
        chains = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target),
                                                                                      PCRSolve)]
        if not chains:
            reasons = "; ".join(f"{c.name}: {c.reason.value if c.reason else c.status}" for c in report.chains)
            raise CompileError(f"deeppcr.compile(group=...): no chain of {type(self.model).__name__} could be "
                               f"split over the ranks ({reasons or 'none found'}). See deeppcr.explain(model, "
                               "inputs) for what the compiler found.")
        if spec.runner is self.model:  # Python side effects or hooks the graph would not repeat
            raise CompileError(f"deeppcr.compile(group=...): {report.notes[-1]}; a model split over ranks runs "
                               "its graph only.")
        node = max(chains, key=lambda n: gm.get_submodule(n.target).length)
        self._split(gm, node)
        self._gm = gm
        self._local = self._materialise(gm)

    def _split(self, gm: fx.GraphModule, node: fx.Node) -> None:
        chain: PCRSolve = gm.get_submodule(node.target)
        L = chain.length
        start, end = self.blocks = split(L, self.group)
        for arg in node.args[1:1 + chain.n_per_step]:
            _slice_per_step(gm, arg, start, end, L)
        gm.add_submodule("rank_solve", _RankSolve(chain, self.group, self.is_first, end - start))
        gm.delete_submodule(node.target)
        node.target = "rank_solve"
        for user in list(node.users):
            if user.target is not operator.getitem or user.args[1] not in (L - 1, -1):
                raise CompileError(f"deeppcr.compile(group=...): {user.format_node()} reads an intermediate state of "
                                   "the chain outside it; a chain split over ranks hands on only its final state "
                                   "(return or use only the last layer's output, or compile without group=).")
            user.update_arg(1, -1)
        graph = gm.graph
        after = _descendants(node)
        if not self.is_first:
            node.update_arg(0, None)  # the initial state is read on the first rank only
        if not self.is_last:
            out = next(n for n in graph.nodes if n.op == "output")
            out.args = (None,)
            for n in reversed([n for n in graph.nodes if n in after]):
                graph.erase_node(n)
        graph.eliminate_dead_code(is_impure_node=lambda n: n is node or n.is_impure())
        graph.lint()
        gm.recompile()

    def _materialise(self, gm: fx.GraphModule) -> list:
        """This rank's Parameters (those its graph reads), materialised from the meta device if needed."""
        owners: dict = {}
        for n in gm.graph.nodes:
            if n.op == "get_attr":
                path, _, _ = n.target.rpartition(".")
                owners[path] = gm.get_submodule(path) if path else gm
            elif n.op == "call_module":
                mod = gm.get_submodule(n.target)
                if isinstance(mod, StackedAttributes):
                    for owner, _ in mod._owners:
                        owners[id(owner)] = owner
                elif n.target != "rank_solve":
                    for sub in mod.modules():
                        owners[id(sub)] = sub
        device = self.device or _default_device(self.group)
        for owner in owners.values():
            if any(t.is_meta for t in [*owner.parameters(recurse=False), *owner.buffers(recurse=False)]):
                owner.to_empty(device=device, recurse=False)
                if hasattr(owner, "reset_parameters"):
                    owner.reset_parameters()
        wanted = {id(p) for o in owners.values() for p in o.parameters(recurse=False)}
        return [(name, p) for name, p in self.model.named_parameters() if id(p) in wanted]


def _signature(args: tuple) -> tuple:
    return tuple((tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else type(a) for a in args)


def _descendants(node: fx.Node) -> set:
    seen, todo = set(), [node]
    while todo:
        for u in todo.pop().users:
            if u not in seen and u.op != "output":
                seen.add(u)
                todo.append(u)
    return seen


def _slice_per_step(gm: fx.GraphModule, arg: fx.Node, start: int, end: int, L: int) -> None:
    """Make a per-step input of the solve read only steps ``start .. end - 1``."""
    if arg.op == "call_module" and isinstance(gm.get_submodule(arg.target), StackedAttributes):
        old = gm.get_submodule(arg.target)
        local = StackedAttributes(gm, list(old.targets[start:end]), old.flat, old.direct_grads)
        local.connect = old.connect
        gm.add_submodule(arg.target, local)
    elif arg.op == "call_function" and arg.target in (torch.stack, torch.tensor) and len(arg.args[0]) == L:
        arg.update_arg(0, list(arg.args[0])[start:end])
    else:
        raise CompileError(f"deeppcr.compile(group=...): the chain's per-step input {arg.format_node()} cannot be "
                           "sliced by rank; compile without group=.")


def _default_device(group: Any) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
