"""``StackedAttributes``: a chain's per-step Parameters as one stacked tensor, without a copy per call.

A rewritten chain needs ``torch.stack([layers.0.weight, ..., layers.L-1.weight])`` on every
call, and its gradient must reach the user's L Parameters. Done naively both directions cost
O(L) small operations per call: the stack itself, and in the backward pass one autograd
``AccumulateGrad`` node per Parameter (on a deep chain more than the whole parallel solve: the
``solve`` and ``solve+stack`` columns of ``benchmarks/results/backward_vs_autograd_cpu.csv``).
This module removes both:

- **Flat storage** (``Config.flat_params``). On first use the Parameters' values are copied
  into one stacked buffer and each Parameter's ``.data`` becomes a view of its row (values,
  Parameter objects, ``requires_grad`` and ``state_dict`` are unchanged; optimizers keep
  working on the same objects). The stack *is* the buffer from then on, so every in-place
  update (``optimizer.step()``, ``p.data.mul_()``, ``load_state_dict``) is seen without any
  cache to invalidate. Each call checks in O(L) pointer reads that every entry is still the
  same tensor viewing the same row; a replaced Parameter or ``.data`` assignment (``.to()``,
  ``.half()``) triggers a re-flatten, and entries that keep changing fall back to
  ``torch.stack`` per call, as does a tensor tied into several steps (it cannot view two rows),
  a Parameter that views a user's larger tensor (``Parameter(flat[l])``: flattening would cut it
  loose) and a tensor swapped in by ``torch.func.functional_call`` (``FlatGroups.may_flatten``).
- **Direct gradients** (``Config.direct_grads``, see ``direct_grads.py``): the flat buffer enters
  the graph through one node whose inputs are the L Parameters (so ``torch.autograd.grad`` and
  ``backward(inputs=...)`` reach them); in a plain ``loss.backward()`` it writes the stacked
  gradient into their ``.grad`` (as views of one buffer) instead of having autograd accumulate
  it leaf by leaf, and hands it to autograd otherwise (hooks, a process group, other requests).

The module keeps each owner module and attribute name (in the GraphModule's tree, which holds
the user's Parameter objects, as ``get_attr`` would read them) and reads ``owner._parameters``
(or ``_buffers``) directly. It owns no Parameters itself: ``state_dict`` is unchanged.

Which buffer a run of Parameters views is a fact about the Parameters, shared by every module
that stacks them: the specialisations of one compiled model (one per input signature), and
every compiled wrapper of the same model. So the flat groups live in one registry,
``FLAT_GROUPS`` (a ``FlatGroups``), that those modules share; each entry lives as long as the
first tensor of its run, and ``FLAT_GROUPS.clear()`` resets it (see ``FlatGroups``).
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch

from .direct_grads import _IS_LEAF, _REQUIRES_GRAD, GradBuffer, direct_grads_apply, supports_direct_grads

# A group that had to be re-flattened this many times in a row (its tensors keep being replaced)
# stops re-flattening and stacks per call.
MAX_REFLATTENS = 3
_DATA_PTR = torch.Tensor.data_ptr


class _FlatGroup:
    """One stacked buffer whose rows are the ``.data`` of ``tensors`` (shared by every specialisation)."""

    def __init__(self, tensors: list) -> None:
        with torch.no_grad():
            self.buffer = torch.stack([t.detach() for t in tensors])
        for t, row in zip(tensors, self.buffer.unbind(0)):
            t.data = row
        self.ids = list(map(id, tensors))
        self.ptrs = list(map(_DATA_PTR, tensors))
        self.grads = GradBuffer()  # where the tensors' .grad views point (direct gradients)

    def matches(self, tensors: list) -> bool:
        """Whether ``tensors`` are still the same tensors, each viewing its row of the buffer."""
        return list(map(id, tensors)) == self.ids and list(map(_DATA_PTR, tensors)) == self.ptrs


class FlatGroups:
    """The flat groups of runs of tensors, found by the id of each run's first tensor.

    Lifetime: an entry lives as long as its first tensor (a ``weakref.finalize`` removes it when
    that tensor is collected; tensors compare elementwise, so they cannot be keys themselves), or
    until ``clear()``. ``clear()`` is always safe: the Parameters keep their values (their
    ``.data`` still views the old buffer, which they keep alive), the next call of each module
    flattens them into a new buffer, and ``.grad`` views made before stay valid.

    ``StackedAttributes`` use ``FLAT_GROUPS`` unless given another registry (``groups=``); modules
    given different registries for the same Parameters take turns re-flattening them and soon
    fall back to stacking per call (``MAX_REFLATTENS``). Each operation is one dictionary
    operation (atomic under the GIL); as with any change of a Parameter's ``.data``, first calls
    of one model from two threads at once are not supported.
    """

    def __init__(self) -> None:
        self._groups: "dict[int, _FlatGroup]" = {}
        self._ours: "dict[int, weakref.ref]" = {}  # tensors this registry made views of (kept by clear())

    def may_flatten(self, t: torch.Tensor) -> bool:
        """Whether ``t`` may become a view of a flat buffer: it owns its whole storage (not a view of a
        user's tensor, e.g. ``Parameter(flat[l])``, which flattening would cut loose from that tensor)
        or already views one of this registry's buffers; and it is a Parameter or needs no gradient (a
        tensor swapped in by ``torch.func.functional_call`` is the caller's own: it is stacked per
        call, and gradients flow to it through the stack)."""
        if not (isinstance(t, torch.nn.Parameter) or not t.requires_grad):
            return False
        ref = self._ours.get(id(t))
        if ref is not None and ref() is t:
            return True
        return t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()

    def get(self, tensors: list) -> Optional[_FlatGroup]:
        """The group whose buffer rows are ``tensors`` now, if there is one."""
        group = self._groups.get(id(tensors[0]))
        return group if group is not None and group.matches(tensors) else None

    def flatten(self, tensors: list) -> _FlatGroup:
        """Copy ``tensors`` into a new stacked buffer, make each view its row, and register the group."""
        group = _FlatGroup(tensors)
        ours = self._ours
        for t in tensors:
            ours[id(t)] = weakref.ref(t, lambda _, k=id(t): ours.pop(k, None))
        key = id(tensors[0])
        if key not in self._groups:
            weakref.finalize(tensors[0], self._groups.pop, key, None)
        self._groups[key] = group
        return group

    def clear(self) -> None:
        """Forget every group (see the class docstring: safe at any time)."""
        self._groups.clear()

    def __len__(self) -> int:
        return len(self._groups)


FLAT_GROUPS = FlatGroups()  # the registry every StackedAttributes shares by default (see the module docstring)


class _Accumulators:
    """A flat group and its tensors' ``AccumulateGrad`` nodes; a copy starts empty (nodes cannot be copied)."""

    def __init__(self) -> None:
        self.group: Optional[_FlatGroup] = None
        self.nodes: list = []

    def __deepcopy__(self, memo) -> "_Accumulators":
        return _Accumulators()

    def __reduce__(self):
        return (_Accumulators, ())


class StackedAttributes(torch.nn.Module):
    """``forward() -> torch.stack([owner.<name> for each (owner, name)])``, kept as flat storage."""

    def __init__(self, root: torch.nn.Module, targets: list, flat: bool = True, direct_grads: bool = True,
                 groups: Optional[FlatGroups] = None) -> None:
        super().__init__()
        self.groups = groups  # None: the shared FLAT_GROUPS, looked up per call (so a copy of the module shares it)
        owners = []
        for target in targets:
            path, _, attr = target.rpartition(".")
            owners.append((root.get_submodule(path) if path else root, attr))
        object.__setattr__(self, "_owners", owners)  # plain references: no submodules, no state_dict keys
        self.targets = tuple(targets)
        self.flat = flat
        self.direct_grads = direct_grads
        self._flattened = False
        self._reflattens = 0  # consecutive calls that found the tensors changed and flattened again
        self.mode = "stack"  # how the last call stacked: "flat" or "stack" (for tests and the report)
        object.__setattr__(self, "_accumulators", _Accumulators())
        # False: leave the Parameters out of the autograd graph (``direct_grads_apply(connect=False)``:
        # faster at thousands of Parameters, but only a plain loss.backward() reaches them). Not a
        # Config option: for benchmarks and callers that know how their gradients are asked for.
        self.connect = True

    def forward(self) -> torch.Tensor:
        # Every per-call pass over the L tensors is a C-level map: at L = 4096 a Python loop per
        # check would cost as much as the solve it feeds.
        tensors = self._tensors()
        group = self._flat(tensors)
        flags = list(map(_REQUIRES_GRAD, tensors)) if torch.is_grad_enabled() else []
        grad = any(flags)
        if group is None:
            self.mode = "stack"
            return torch.stack(tensors)
        self.mode = "flat"
        if not grad:
            # Under grad mode the solve may save these values for a backward pass (for an input's
            # gradient): a copy keeps a later in-place update of the frozen tensors from reaching it.
            return group.buffer.clone() if torch.is_grad_enabled() else group.buffer.detach()
        if self.direct_grads and all(flags):  # leaves (a flat group's are), each of its own row
            if not self.connect and supports_direct_grads(tensors, flags):
                return direct_grads_apply(group.buffer, tensors, group.grads, connect=False)
            self._keep_accumulators(group, tensors)
            return direct_grads_apply(group.buffer, tensors, group.grads)
        return torch.stack(tensors)  # autograd's own path: partly frozen tensors

    def _keep_accumulators(self, group: _FlatGroup, tensors: list) -> None:
        """Hold the tensors' ``AccumulateGrad`` nodes while ``group`` is current: a leaf holds its node
        only weakly, so each forward pass would otherwise make L new ones (half the cost of giving
        the graph L Parameter inputs: ``benchmarks/results/backward_vs_autograd_cpu.csv``). Kept here,
        not in the shared group, whose lifetime the first tensor decides (a node holds its tensor)."""
        held = self._accumulators
        if held.group is not group:
            held.group, held.nodes = group, [torch.autograd.graph.get_gradient_edge(t).node for t in tensors]

    def _tensors(self) -> list:
        try:
            return list(map(dict.__getitem__, *self._tables))
        except (AttributeError, KeyError):  # first call, or an entry is no longer a Parameter / buffer
            tables = [owner._parameters if attr in owner._parameters else owner._buffers for owner, attr in self._owners]
            attrs = [attr for _, attr in self._owners]
            object.__setattr__(self, "_tables", (tables, attrs))
            values = [table.get(attr) for table, attr in zip(tables, attrs)]
            if any(v is None for v in values):
                object.__delattr__(self, "_tables")
                return [getattr(owner, attr) for owner, attr in self._owners]
            return values

    def _flat(self, tensors: list) -> Optional[_FlatGroup]:
        """The flat group whose buffer rows are ``tensors``, (re)made if needed; None when stacking per call."""
        if not self.flat or self._reflattens >= MAX_REFLATTENS:
            return None
        registry = FLAT_GROUPS if self.groups is None else self.groups
        group = registry.get(tensors)
        if group is not None:
            self._reflattens = 0
            return group
        if torch.is_inference_mode_enabled() or not all(map(_IS_LEAF, tensors)) \
                or len({(t.shape, t.dtype, t.device) for t in tensors}) != 1 \
                or len(set(map(id, tensors))) != len(tensors) \
                or not all(map(registry.may_flatten, tensors)):
            return None
        if self._flattened:  # flattened before, and the tensors have changed since
            self._reflattens += 1
        self._flattened = True
        return registry.flatten(tensors)

    def extra_repr(self) -> str:
        first, last = self.targets[0], self.targets[-1]
        return f"{first}, ..., {last} ({len(self.targets)} tensors)" if len(self.targets) > 2 else ", ".join(self.targets)


