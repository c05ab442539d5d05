"""The setup of a layer-parallel solve: whether the ranks describe one chain, in one tensor all-gather.

Every rank packs what it holds into a fixed-size float64 vector (the same layout everywhere):

    error flag, slice length, whether its inputs need gradients, a hash of the layout that must agree
    (per-step shapes and dtypes after the step dimension, shared inputs, options, grad mode),
    its x0's structure (components, shapes, dtypes; rank 0's is the chain's), which shared tensors
    require grad, its initial guess's shape/dtype/finiteness, and inline (up to ``INLINE``
    elements each) rank 0's x0 and each rank's initial-guess last row (the next rank's first halo).

One all-gather of these vectors gives every rank the state spec, every slice length, x0, the warm
starts and the gradient needs. Anything unusual (a rank's local error, a hash or x0 mismatch, a
state structure too large for the fixed layout) sends every rank (they all see the same gathered
rows) to the slow path: the pickled facts of every rank (``all_gather_object``) checked field by
field, which names what differs. A state wider than ``INLINE`` takes one more all-gather for x0
and the guesses' last rows.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .distributed_comm import Comm
from .state import StateSpec

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
MAX_COMPONENTS, MAX_DIMS, MAX_SHARED, INLINE = 8, 6, 32, 512
_ERR, _LEN, _NEEDS, _HASH, _HAS_X0, _SPEC_OK, _N_SHARED, _GUESS, _SPEC = 0, 1, 2, 3, 5, 6, 7, 8, 14
_SHARED_AT = _SPEC + 3 + MAX_COMPONENTS * (2 + MAX_DIMS)
_X0_AT = _SHARED_AT + MAX_SHARED
_GUESS_AT = _X0_AT + INLINE
EXTRA = 4  # the caller's numbers (``extra``: the backend vote, ``distributed_fused.vote``)
_EXTRA_AT = _GUESS_AT + INLINE
SIZE = _EXTRA_AT + EXTRA


@dataclass
class Layout:
    spec: StateSpec
    lengths: list
    x0_flat: torch.Tensor  # rank 0's x0 in the flat layout (B, n), on every rank
    warm: list  # per rank: its initial guess is usable
    guess_lasts: list  # per rank: the last row of its usable guess (None where cold)
    needs_grad: list  # per rank
    shared_grad: list  # per shared tensor: requires grad on some rank
    extra: Optional[list] = None  # per rank: its ``extra`` numbers (None after the slow path)


def _code(dtype: torch.dtype) -> int:
    return DTYPES.index(dtype) if dtype in DTYPES else -1


def _hash(obj: Any) -> tuple:
    h = int.from_bytes(hashlib.blake2b(repr(obj).encode(), digest_size=8).digest(), "little")
    return h >> 32, h & 0xFFFFFFFF


def _guess_info(guess: Optional[torch.Tensor], device: torch.device) -> Optional[tuple]:
    if guess is None or not isinstance(guess, torch.Tensor) or guess.dim() != 3 or guess.device != device:
        return None
    return tuple(guess.shape), _code(guess.dtype), bool(torch.isfinite(guess).all())


def setup(comm: Comm, facts: Optional[dict], error: Optional[str], x0, initial_guess: Optional[torch.Tensor],
          device: torch.device, raise_if_any, check_layout, extra=()) -> Layout:
    """Agree on the chain (``facts`` from ``distributed._local_facts``, or ``error``); see the module docstring.

    ``raise_if_any(errors, what, comm)`` and ``check_layout(facts, comm)`` raise the slow path's errors.
    ``extra``: up to EXTRA numbers of this rank's that every rank receives (``Layout.extra``; fast path only)."""
    spec = None if facts is None else facts["spec"]
    ginfo = _guess_info(initial_guess, device)
    buf = torch.zeros(SIZE, dtype=torch.float64)
    if len(extra):
        buf[_EXTRA_AT:_EXTRA_AT + len(extra)] = torch.tensor(list(extra)[:EXTRA], dtype=torch.float64)
    spec_ok = spec is not None and len(spec.shapes) <= MAX_COMPONENTS and all(
        len(s) <= MAX_DIMS for s in spec.shapes) and all(_code(d) >= 0 for d in spec.dtypes)
    if error is not None or facts is None:
        buf[_ERR] = 1
    else:
        buf[_LEN], buf[_NEEDS] = facts["length"], float(facts["needs_grad"])
        buf[_HASH], buf[_HASH + 1] = _hash((facts["per_step"], facts["shared"], facts["options"]))
        buf[_N_SHARED] = len(facts["shared_grad"])
        if len(facts["shared_grad"]) <= MAX_SHARED:
            buf[_SHARED_AT:_SHARED_AT + len(facts["shared_grad"])] = torch.tensor(facts["shared_grad"],
                                                                                 dtype=torch.float64)
        buf[_HAS_X0], buf[_SPEC_OK] = float(spec is not None), float(spec_ok)
        if spec_ok:
            buf[_SPEC:_SPEC + 3] = torch.tensor([len(spec.shapes), float(spec.is_tuple), float(spec.batch)])
            for i, (shape, dtype) in enumerate(zip(spec.shapes, spec.dtypes)):
                at = _SPEC + 3 + i * (2 + MAX_DIMS)
                buf[at], buf[at + 1] = _code(dtype), len(shape)
                buf[at + 2:at + 2 + len(shape)] = torch.tensor(shape, dtype=torch.float64)
            if comm.rank == 0 and spec.batch_size * spec.width <= INLINE:
                x0_flat = spec.flatten(x0).detach().reshape(-1)
                buf[_X0_AT:_X0_AT + x0_flat.numel()] = x0_flat.to(torch.float64, copy=True).cpu()
        if ginfo is not None:
            (g0, g1, g2), gcode, finite = ginfo
            buf[_GUESS:_GUESS + 6] = torch.tensor([1.0, g0, g1, g2, gcode, float(finite)], dtype=torch.float64)
            if finite and g1 * g2 <= INLINE and g0 > 0:
                buf[_GUESS_AT:_GUESS_AT + g1 * g2] = initial_guess[-1].detach().reshape(-1).to(torch.float64).cpu()
    rows = comm.gather(buf.to(device), "setup").cpu()
    if not _fast_path_ok(rows):
        return _slow_path(comm, facts, error, x0, initial_guess, ginfo, device, raise_if_any, check_layout)
    spec = _decode_spec(rows[0])
    B, n = spec.batch_size, spec.width
    lengths = [int(v) for v in rows[:, _LEN].tolist()]
    if B * n <= INLINE:
        x0_flat = rows[0, _X0_AT:_X0_AT + B * n].to(device=device, dtype=spec.compute_dtype).view(B, n)
        lasts = rows[:, _GUESS_AT:_GUESS_AT + B * n]
    else:
        x0_flat, lasts = _gather_big(comm, spec, x0, initial_guess, device, ginfo)
    warm = [_warm(row, lengths[q], spec) for q, row in enumerate(rows)]
    guess_lasts = [lasts[q].to(device=device, dtype=spec.compute_dtype).view(B, n) if warm[q] else None
                   for q in range(comm.size)]
    n_shared = int(rows[0, _N_SHARED])
    shared_grad = (rows[:, _SHARED_AT:_SHARED_AT + n_shared] > 0).any(0).tolist()
    return Layout(spec, lengths, x0_flat, warm, guess_lasts, (rows[:, _NEEDS] > 0).tolist(), shared_grad,
                  rows[:, _EXTRA_AT:_EXTRA_AT + EXTRA].tolist())


def _fast_path_ok(rows: torch.Tensor) -> bool:
    if bool((rows[:, _ERR] != 0).any()) or not bool((rows[:, _HASH:_HASH + 2] == rows[0, _HASH:_HASH + 2]).all()):
        return False
    if rows[0, _HAS_X0] != 1 or rows[0, _SPEC_OK] != 1 or rows[0, _N_SHARED] > MAX_SHARED:
        return False
    spec_part = slice(_SPEC, _SHARED_AT)
    for row in rows[1:]:
        if row[_HAS_X0] == 1 and (row[_SPEC_OK] != 1 or not bool((row[spec_part] == rows[0, spec_part]).all())):
            return False
    return True


def _decode_spec(row: torch.Tensor) -> StateSpec:
    k, is_tuple, batch = (int(v) for v in row[_SPEC:_SPEC + 3].tolist())
    shapes, dtypes = [], []
    for i in range(k):
        at = _SPEC + 3 + i * (2 + MAX_DIMS)
        code, nd = int(row[at]), int(row[at + 1])
        dtypes.append(DTYPES[code])
        shapes.append(tuple(int(v) for v in row[at + 2:at + 2 + nd].tolist()))
    return StateSpec(shapes=tuple(shapes), dtypes=tuple(dtypes), is_tuple=bool(is_tuple), batch=bool(batch))


def _warm(row: torch.Tensor, length: int, spec: StateSpec) -> bool:
    has, g0, g1, g2, code, finite = row[_GUESS:_GUESS + 6].tolist()
    return has == 1 and finite == 1 and (int(g0), int(g1), int(g2)) == (length, spec.batch_size, spec.width) \
        and int(code) == _code(spec.compute_dtype)


def _gather_big(comm: Comm, spec: StateSpec, x0, initial_guess, device, ginfo) -> tuple:
    """x0 (rank 0's) and every rank's guess last row, for states wider than ``INLINE``: one all-gather."""
    B, n = spec.batch_size, spec.width
    buf = torch.zeros(2 * B * n, dtype=torch.float64, device=device)
    if comm.rank == 0:
        buf[:B * n] = spec.flatten(x0).detach().reshape(-1).to(torch.float64)
    if ginfo is not None and ginfo[0] == (initial_guess.shape[0], B, n) and ginfo[2] and ginfo[0][0] > 0:
        buf[B * n:] = initial_guess[-1].detach().reshape(-1).to(torch.float64)
    rows = comm.gather(buf, "setup (x0)").cpu()
    return rows[0, :B * n].to(device=device, dtype=spec.compute_dtype).view(B, n), rows[:, B * n:]


def _slow_path(comm: Comm, facts, error, x0, initial_guess, ginfo, device, raise_if_any, check_layout) -> Layout:
    gathered = comm.gather_objects((error, facts, ginfo), "setup")
    raise_if_any([e for e, _, _ in gathered], "setup", comm)
    all_facts = [f for _, f, _ in gathered]
    spec, lengths = check_layout(all_facts, comm)
    x0_flat, lasts = _gather_big(comm, spec, x0, initial_guess, device, ginfo)
    B, n = spec.batch_size, spec.width
    warm = [gi is not None and gi[0] == (lengths[q], B, n) and gi[1] == _code(spec.compute_dtype) and gi[2]
            for q, (_, _, gi) in enumerate(gathered)]
    guess_lasts = [lasts[q].to(device=device, dtype=spec.compute_dtype).view(B, n) if warm[q] else None
                   for q in range(comm.size)]
    shared_grad = [any(col) for col in zip(*(f["shared_grad"] for f in all_facts))]
    return Layout(spec, lengths, x0_flat, warm, guess_lasts, [f["needs_grad"] for f in all_facts], shared_grad)
