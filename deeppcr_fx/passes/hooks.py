"""Module hooks: a parallel solve cannot call them, so chains through hooked modules stay sequential.

A forward or backward hook on a module inside a chain would have to run at every step with
that step's values; the solver evaluates all steps at once and never calls the modules.
So: symbolic tracing keeps a hooked module opaque (the emitted graph calls the user's module,
and its hooks fire), validation refuses any chain that covers a hooked module
(``Reason.HOOKED_MODULE``), and a compiled module re-specialises when hooks appear later.

Inert hooks are not counted: hooks known to do nothing unless their library turned them on for
one call. Hugging Face transformers installs ``output_capturing_hook`` on a model's layers the
first time it is called with ``output_hidden_states`` / ``output_attentions``, for good; it
returns at once unless a collector is active for the current call. When one is (a call asking
for hidden states), it appends the layer's output to the collector: a recorded run or a
TorchDynamo graph captures that (the collected tensors are outputs of the graph). Symbolic
tracing never runs hooks, so it still keeps every hooked module opaque (``has_hooks(m,
inert=True)``).

That guard costs O(1) per call: every hook registration in torch (module, global or tensor)
creates a ``torch.utils.hooks.RemovableHandle``, which takes its id from one class counter;
only when that counter moved does the compiled module look at its modules' hooks again.
"""
from __future__ import annotations

import torch
from torch.nn.modules import module as _module
from torch.utils.hooks import RemovableHandle

_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def global_hooks() -> bool:
    """Whether hooks registered for every module (``register_module_forward_hook`` ...) exist."""
    return any(getattr(_module, name, None) for name in _GLOBAL_HOOKS)


# (module, function name) of hooks that act only while their library enables them for a call (see above)
_INERT = {("transformers.utils.output_capturing", "output_capturing_hook"),
          ("transformers.utils.generic", "output_capturing_hook")}


def _inert(hook) -> bool:
    return (getattr(hook, "__module__", None), getattr(hook, "__name__", None)) in _INERT


def _live(table) -> bool:
    return bool(table) and not all(_inert(h) for h in table.values())


def has_hooks(m: torch.nn.Module, inert: bool = False) -> bool:
    """Whether calling ``m`` runs hooks (its own or global ones); ``inert``: count inert hooks too."""
    return global_hooks() or any((inert and getattr(m, name, None)) or _live(getattr(m, name, None))
                                 for name in _MODULE_HOOKS)


def describe_hooks(m: torch.nn.Module) -> str:
    kinds = [name.strip("_").replace("_", " ") for name in _MODULE_HOOKS if getattr(m, name, None)]
    return ", ".join(kinds) if kinds else "global module hooks"


def hook_epoch() -> int:
    """A number that changes whenever any hook is registered anywhere in torch."""
    return RemovableHandle.next_id


def hooked(model: torch.nn.Module) -> frozenset:
    """The names of ``model``'s modules that have hooks now (``""`` for global hooks)."""
    names = {path for path, m in model.named_modules() if any(_live(getattr(m, k, None)) for k in _MODULE_HOOKS)}
    return frozenset(names | ({""} if global_hooks() else set()))
