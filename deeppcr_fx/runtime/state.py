"""The chain's state as the solver sees it: one ``(B, n)`` matrix in the compute dtype.

A user state is a tensor or a tuple of tensors (e.g. an LSTM's ``(h, c)`` or a multistep
scheduler's ``(x, eps_prev)``). ``StateSpec`` records its structure once and converts
between the user's structure and the solver's flat layout:

    user state (B, *s_i) per component  <->  flat (B, n),  n = sum_i prod(s_i)

With ``batch=False`` the whole state is one sample (B = 1). A leading steps axis
(L, ...) is carried through both directions unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from ..results import InvalidInput

State = Union[torch.Tensor, tuple]


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The dtype the linear algebra runs in: half types are solved in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sample_layout(shape: Sequence[int], batch: Optional[bool]) -> tuple[int, int]:
    """``(B, n)``: how the solver splits a single-tensor state of ``shape`` into samples.

    The one rule behind ``StateSpec.of`` for a single tensor, for code that knows only a shape
    (the compiler's report and cost model): with ``batch=None`` a tensor of >= 2 dims is B
    samples of n elements; ``batch=False`` (or a 0-d/1-d tensor) is one sample of all elements.
    """
    shape = tuple(shape)
    return (shape[0], math.prod(shape[1:])) if batched_layout(shape, batch) else (1, math.prod(shape))


def batched_layout(shape: Sequence[int], batch: Optional[bool]) -> bool:
    """Whether ``sample_layout`` (and ``StateSpec.of``, its ``batch``) reads a single-tensor state of
    ``shape`` as a batch of samples along dim 0 (B may be 1): ``batch=None`` and >= 2 dims, or
    ``batch=True`` and >= 1 dim."""
    return len(shape) >= 2 if batch is None else bool(batch) and len(shape) >= 1


@dataclass(frozen=True)
class StateSpec:
    shapes: tuple  # per component, full shape including the batch dim when batched
    dtypes: tuple
    is_tuple: bool
    batch: bool

    @staticmethod
    def of(x0: object, batch: Optional[bool]) -> "StateSpec":
        parts = _components(x0, "x0")
        if batch is None:
            batch = all(p.dim() >= 2 for p in parts) and len({p.shape[0] for p in parts}) == 1
        elif batch and not (all(p.dim() >= 1 for p in parts) and len({p.shape[0] for p in parts}) == 1):
            raise InvalidInput(
                "Config(batch=True) needs every state tensor to share its leading (batch) size; got shapes "
                f"{[tuple(p.shape) for p in parts]}. Use batch=False to treat the state as one sample."
            )
        return StateSpec(
            shapes=tuple(tuple(p.shape) for p in parts),
            dtypes=tuple(p.dtype for p in parts),
            is_tuple=isinstance(x0, tuple),
            batch=bool(batch),
        )

    # sizes -----------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.shapes[0][0] if self.batch else 1

    @property
    def sample_sizes(self) -> tuple:
        return tuple(math.prod(s[1:] if self.batch else s) for s in self.shapes)

    @property
    def width(self) -> int:
        """n: elements per sample of the flattened state."""
        return sum(self.sample_sizes)

    @property
    def compute_dtype(self) -> torch.dtype:
        return compute_dtype_for(torch.float64 if torch.float64 in self.dtypes else self.dtypes[0])

    # conversions ---------------------------------------------------------------------------
    def flatten(self, state: State, lead: int = 0) -> torch.Tensor:
        """User state with ``lead`` extra leading dims -> ``(*lead_dims, B, n)`` in the compute dtype."""
        parts = _components(state, "state")
        lead_shape = parts[0].shape[:lead]
        flat = [p.reshape(*lead_shape, self.batch_size, -1).to(self.compute_dtype) for p in parts]
        return flat[0] if len(flat) == 1 else torch.cat(flat, dim=-1)

    def unflatten(self, flat: torch.Tensor, lead: int = 0) -> State:
        """``(*lead_dims, B, n)`` -> user state in the user's dtypes."""
        lead_shape = flat.shape[:lead]
        chunks = flat.split(list(self.sample_sizes), dim=-1) if len(self.shapes) > 1 else (flat,)
        parts = tuple(
            c.reshape((*lead_shape, *shape)).to(dtype) for c, shape, dtype in zip(chunks, self.shapes, self.dtypes)
        )
        return parts if self.is_tuple else parts[0]

    def check_step_output(self, out: object) -> None:
        """Raise a clear error when ``step`` changed the state's structure, shape or dtype."""
        if self.is_tuple != isinstance(out, tuple) or (self.is_tuple and len(out) != len(self.shapes)):
            kind = f"a tuple of {len(self.shapes)} tensors" if self.is_tuple else "a tensor"
            raise InvalidInput(f"step must return the state's structure ({kind}); it returned {_describe(out)}.")
        for i, (p, shape, dtype) in enumerate(zip(_components(out, "step output"), self.shapes, self.dtypes)):
            where = f" (component {i})" if self.is_tuple else ""
            if tuple(p.shape) != shape:
                raise InvalidInput(
                    f"step changed the state's shape{where} from {shape} to {tuple(p.shape)}; "
                    "a chain's steps must map the state to a state of the same shape."
                )
            if p.dtype != dtype:
                raise InvalidInput(
                    f"step changed the state's dtype{where} from {dtype} to {p.dtype}; "
                    "cast inside the step so it returns the state's dtype."
                )


def _components(x: object, name: str) -> Sequence[torch.Tensor]:
    parts = x if isinstance(x, tuple) else (x,)
    if not parts or not all(isinstance(p, torch.Tensor) for p in parts):
        raise InvalidInput(f"{name} must be a tensor or a tuple of tensors, got {_describe(x)}.")
    for p in parts:
        if not p.is_floating_point():
            raise InvalidInput(f"{name} tensors must be floating point, got dtype {p.dtype}.")
    return parts


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    if isinstance(x, tuple):
        return "a tuple of (" + ", ".join(_describe(p) for p in x) + ")"
    return f"a {type(x).__name__}"
