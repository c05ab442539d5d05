"""``StackedAttributes``: the per-step Parameters of a chain, stacked at call time.

A rewritten chain needs ``torch.stack([layers.0.weight, ..., layers.L-1.weight])`` on
every call, so that gradients and optimizer steps reach the user's Parameters. Emitting
L ``get_attr`` nodes for it costs L attribute walks through the module tree per call; this
module keeps each owner module (in the GraphModule's tree, which holds the user's Parameter
objects, as ``get_attr`` would read them) and attribute name, and reads ``owner._parameters``
(or ``_buffers``) directly. It owns no Parameters itself: ``state_dict`` is unchanged.
"""
from __future__ import annotations

import torch


class StackedAttributes(torch.nn.Module):
    """``forward() -> torch.stack([owner.<name> for each (owner, name)])``."""

    def __init__(self, root: torch.nn.Module, targets: list) -> None:
        super().__init__()
        owners = []
        for target in targets:
            path, _, attr = target.rpartition(".")
            owners.append((root.get_submodule(path) if path else root, attr))
        object.__setattr__(self, "_owners", owners)  # plain references: no submodules, no state_dict keys
        self.targets = tuple(targets)

    def forward(self) -> torch.Tensor:
        return torch.stack([_read(owner, attr) for owner, attr in self._owners])

    def extra_repr(self) -> str:
        first, last = self.targets[0], self.targets[-1]
        return f"{first}, ..., {last} ({len(self.targets)} tensors)" if len(self.targets) > 2 else ", ".join(self.targets)


def _read(owner: torch.nn.Module, attr: str) -> torch.Tensor:
    table = owner._parameters if attr in owner._parameters else owner._buffers
    value = table.get(attr)
    return getattr(owner, attr) if value is None else value
