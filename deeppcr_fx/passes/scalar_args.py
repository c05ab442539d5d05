"""Ops whose per-step coefficient sits in an argument that must be a Python number, in tensor arithmetic.

A chain whose steps differ only by a float (``torch.add(x, y, alpha=c_i)``, ``F.leaky_relu(x, c_i)``)
reads that float as a per-step coefficient: a 0-d tensor in the step template, batched over the
steps by vmap. Most ops accept it where they accepted the number; these do not (their schema wants a
``Scalar``: on meta tensors, ``Tensor.item()`` fails). In a step template, and only where a
coefficient is such an argument, they become the same arithmetic in ops that take tensors — the
formulas of their ATen kernels (``aten/src/ATen/native/Activation.cpp``, ``BinaryOps.cpp``), with the
unselected branch of each ``where`` kept finite so gradients stay exact. Elsewhere the original op runs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _tensor(v, like: torch.Tensor) -> torch.Tensor:
    return v if isinstance(v, torch.Tensor) else like.new_tensor(v)


def add(input, other, *, alpha=1, out=None):
    return input + other * alpha


def sub(input, other, *, alpha=1, out=None):
    return input - other * alpha


def addcmul(input, tensor1, tensor2, *, value=1, out=None):
    return input + value * tensor1 * tensor2


def addcdiv(input, tensor1, tensor2, *, value=1, out=None):
    return input + value * tensor1 / tensor2


def leaky_relu(input, negative_slope=0.01, inplace=False):
    return torch.where(input > 0, input, input * negative_slope)


def hardtanh(input, min_val=-1.0, max_val=1.0, inplace=False):
    return torch.minimum(torch.maximum(input, _tensor(min_val, input)), _tensor(max_val, input))


def elu(input, alpha=1.0, inplace=False):
    return torch.where(input > 0, input, alpha * torch.expm1(torch.clamp(input, max=0)))


def softplus(input, beta=1.0, threshold=20.0):
    scaled = input * beta
    linear = scaled > threshold
    return torch.where(linear, input, torch.log1p(torch.exp(torch.where(linear, torch.zeros_like(scaled), scaled))) / beta)


# original op -> (its tensor-coefficient form, the Scalar arguments: (position, keyword))
SCALAR_FORMS = {
    torch.add: (add, ((None, "alpha"),)), torch.sub: (sub, ((None, "alpha"),)),
    torch.addcmul: (addcmul, ((None, "value"),)), torch.addcdiv: (addcdiv, ((None, "value"),)),
    F.leaky_relu: (leaky_relu, ((1, "negative_slope"),)), torch._C._nn.leaky_relu: (leaky_relu, ((1, "negative_slope"),)),
    F.hardtanh: (hardtanh, ((1, "min_val"), (2, "max_val"))),
    torch._C._nn.hardtanh: (hardtanh, ((1, "min_val"), (2, "max_val"))),
    F.elu: (elu, ((1, "alpha"),)), torch._C._nn.elu: (elu, ((1, "alpha"),)),
    F.softplus: (softplus, ((1, "beta"), (2, "threshold"))),
}
_METHODS = {"add": torch.add, "sub": torch.sub, "addcmul": torch.addcmul, "addcdiv": torch.addcdiv}


def tensor_form(op: str, target, args: tuple, kwargs: dict, coefficients: set):
    """``(function, args)`` computing ``target(*args, **kwargs)`` with tensor coefficients, where one of the
    per-step ``coefficients`` (template placeholders) is a Scalar argument of ``target``; else None."""
    if op == "call_method":
        target, args = _METHODS.get(target), args
    elif op != "call_function":
        return None
    form = SCALAR_FORMS.get(target) if target is not None else None
    if form is None:
        return None
    function, scalars = form
    for index, name in scalars:
        value = kwargs.get(name, args[index] if index is not None and index < len(args) else None)
        if value in coefficients:
            return function, args
    return None
