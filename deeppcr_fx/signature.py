"""What a specialisation depends on: the key ``CompiledModule`` computes on every call.

Grad mode, saved-tensor hooks, ``torch.autocast``, the train/eval flags of the modules whose
forward may read them, and each input's shape, dtype and device (or a value's repr). Built on
every call, so it must stay cheap: O(1) in the model's depth for stacks of torch's own layers.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch

_TRAINING = operator.attrgetter("training")

# torch.nn classes whose forward never reads ``self.training`` (checked against torch's source by
# tests/test_compile_signature.py): the per-call signature skips their flags, so it costs O(1)
# instead of O(depth) on a deep stack of Linear/Tanh layers. Exact types only: a user's subclass
# may read the flag, and so may any other module (Dropout, BatchNorm, a user's block).
_TRAINING_FREE = frozenset(getattr(torch.nn, name) for name in (
    "Linear", "Bilinear", "Identity", "Flatten", "Unflatten",
    "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
    "LayerNorm", "GroupNorm", "RMSNorm", "Embedding",
    "Tanh", "ReLU", "ReLU6", "GELU", "SiLU", "Sigmoid", "Softplus", "LeakyReLU", "ELU", "SELU", "CELU",
    "Mish", "Hardtanh", "Hardswish", "Hardsigmoid", "LogSigmoid", "Softsign", "Tanhshrink", "PReLU",
    "Softmax", "LogSoftmax", "GLU",
    "MaxPool1d", "MaxPool2d", "MaxPool3d", "AvgPool1d", "AvgPool2d", "AvgPool3d",
    "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveAvgPool3d", "Upsample", "PixelShuffle",
    "Sequential", "ModuleList", "ModuleDict", "ParameterList", "ParameterDict",
) if hasattr(torch.nn, name))


def training_sensitive(model: torch.nn.Module) -> list:
    """The modules of ``model`` whose train/eval flag may change what their forward computes."""
    return [m for m in model.modules() if type(m) not in _TRAINING_FREE]


# Whether saved-tensor hooks are active (non-reentrant torch.utils.checkpoint): torch.func, which the
# solver and the validator use, refuses to run under them, so such calls get their own specialisation.
_saved_tensor_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", lambda tracing: None)


def _autocast() -> tuple:
    """Which devices ``torch.autocast`` is on for, with its dtype (empty when it is off)."""
    return tuple((d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d))


def signature(args: tuple, flag_modules: list, kwargs: Optional[dict] = None) -> tuple:
    """What a specialisation depends on: grad mode, saved-tensor hooks, autocast, the train/eval flags
    of ``flag_modules``, and each input's shape, dtype and device (or a value's repr), keyword inputs
    by name (in the order given). Built on every call: keep it cheap."""
    key = [torch.is_grad_enabled(), _saved_tensor_hooks(False) is not None, _autocast(),
           tuple(map(_TRAINING, flag_modules))]
    for a in args:
        if isinstance(a, torch.Tensor):
            key += (a.shape, a.dtype, a.device)
        else:
            key += ("value", type(a).__name__, repr(a))
    if kwargs:
        for name, a in kwargs.items():
            if isinstance(a, torch.Tensor):
                key += (name, a.shape, a.dtype, a.device)
            else:
                key += (name, "value", type(a).__name__, repr(a))
    return tuple(key)


def _describe(a) -> str:
    return f"{str(a.dtype).replace('torch.', '')}{list(a.shape)}@{a.device}" if isinstance(a, torch.Tensor) else repr(a)


def describe(args: tuple, kwargs: Optional[dict] = None) -> str:
    """``float32[2, 4]@cpu, 3, mask=int64[2, 4]@cpu``: the inputs, for reports and messages."""
    return ", ".join([_describe(a) for a in args] + [f"{k}={_describe(a)}" for k, a in (kwargs or {}).items()])


def autocast_on() -> bool:
    """Whether ``torch.autocast`` is on for any device."""
    return bool(_autocast())
