"""The emitted graph reads the model's own modules, so what it reads is live.

``fx.GraphModule(root, graph)`` copies, for every ``get_attr``/``call_module`` target, the
attribute itself but builds new, empty ``nn.Module`` objects for the path to it: the graph
then holds the Parameter objects it traced, and a Parameter the user replaces later
(``load_state_dict(sd, assign=True)``, ``model.layer.weight = nn.Parameter(...)``) or a
hook the user registers is never seen. ``share_children`` puts the model's own child
modules in place of those copies, so every read goes through the user's modules at call time.
"""
from __future__ import annotations

import torch
import torch.fx as fx


def share_children(gm: fx.GraphModule, model: torch.nn.Module) -> fx.GraphModule:
    """Replace ``gm``'s top-level submodules by ``model``'s children of the same name; returns ``gm``."""
    for name, child in list(gm._modules.items()):
        own = model._modules.get(name)
        if own is not None and own is not child:
            gm._modules[name] = own
    return gm
