"""The Jacobian modes as objects: what each linearisation forms, how its maps act, and what it costs.

A Newton iteration solves ``delta_l = A_l delta_{l-1} + r_l`` where ``A_l`` approximates the step's
Jacobian ``J_l``. The mode says which approximation, and everything that follows from it lives here:

    mode      A_l held as          linearised  exact  couples rows  one scan round       known as
    full      (L, B, n, n) dense   yes         yes    yes           O(L B n^3)          DeepPCR / DEER
    diag      (L, B, n) diagonal   yes         no     yes           O(L B n)            quasi-DEER (ELK)
    identity  None (A = I)         no          no     yes           a cumulative sum    Picard
    zero      None (A = 0)         no          no     no            none (delta = r)    Jacobi

- ``linearised``: the mode forms matrices from the step (``jacobians``: ``structure`` keeps the dense
  Jacobian or its diagonal); the others evaluate the step only and hold ``A = None``.
- ``exact``: A is the step's (per-sample) Jacobian. Newton converges quadratically, so a solve ends
  when every row passes the tolerance (not 0.3x it) and adds the remainder update after a quadratic
  step (``newton``); the adjoint is one reverse scan with these matrices (``adjoint``).
- ``couples``: delta_l depends on the rows before it; ``zero`` is the one that does not (no scan, no
  exchange between ranks).

The algorithms are written once, for every mode, in terms of a mode's operations: ``apply`` (A x) and
``compose`` (A B) for eager PCR and the distributed reduce (``scan``, ``distributed_scan``), their
in-place forms for the chunked sweep, ``fused_apply``/``fused_compose`` as broadcasts for the compiled
scan (``fused_scan``), ``transpose`` for the adjoint, ``unit`` (the identity map) and ``map_numel`` for
the cross-rank exchange, and ``closed_scan``/``closed_reduce`` where a mode without matrices solves the
recurrence in closed form. ``scan_terms`` are the mode's terms in the compiler's cost model
(``passes/cost_model.py``).

The public API names modes by string (``Config(jacobian=...)``, ``SolveStats.jacobian``, reports):
``mode_of(name)`` gives the object, ``Mode.name`` the string, ``choose_mode`` resolves ``"auto"``.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from ..results import InvalidInput

# jacobian="auto" uses full Jacobians only while all of them together have at most this many elements
FULL_MAX_ELEMENTS = 1 << 26


class Mode:
    """One Jacobian mode (see the module docstring). Stateless; one instance per mode (``mode_of``)."""

    name = ""
    linearised = False
    exact = False
    couples = True

    def __repr__(self) -> str:
        return f"Mode({self.name!r})"

    def __str__(self) -> str:
        return self.name

    def structure(self, jacobian: torch.Tensor) -> torch.Tensor:
        """The mode's A from dense Jacobians (..., n, n) (linearised modes only)."""
        raise InvalidInput(f"Jacobian mode {self.name!r} forms no matrices")

    def c_products(self, n: int) -> Optional[dict]:
        """C++ of the mode's products for ``cscan`` (linearised modes), None where there is none."""
        return None

    def closed_scan(self, r: torch.Tensor, transpose: bool = False, copy: bool = True) -> torch.Tensor:
        """The recurrence's solution where the mode holds no matrices (``scan.affine_scan``'s module docstring);
        ``transpose``: the adjoint recurrence; ``copy=False`` may return ``r`` itself (traced code)."""
        raise InvalidInput(f"Jacobian mode {self.name!r} needs a scan with its matrices")

    def closed_reduce(self, r: torch.Tensor) -> torch.Tensor:
        """The constant c of the composition of all rows ``x -> x + c`` (modes without matrices)."""
        raise ValueError(f"no map reduction for Jacobian mode {self.name!r}")

    def map_numel(self, batch: int, width: int) -> int:
        """Elements of one composed map's matrix as the distributed scan exchanges it (0: none travels)."""
        return 0

    def map_shape(self, batch: int, width: int) -> Optional[tuple]:
        """The shape of one composed map's matrix (None: the mode holds none)."""
        return None

    def unit(self, batch: int, width: int, like: torch.Tensor) -> Optional[torch.Tensor]:
        """The identity map in the mode's structure for (batch, width) states (None: no matrices)."""
        return None

    def scan_terms(self, N, SB, JB, R, K=None) -> dict:
        """One scan's counts for the cost model (``passes/cost_model.Work`` fields): N = L·B rows·samples,
        SB and JB the bytes of the states and Jacobians, R PCR rounds (across the chunks when chunked), K
        rows per chunk (None: plain PCR). Numbers or sympy expressions alike."""
        return dict(launches=1, bytes=2 * SB)  # a cumulative sum or a copy


class _Linearised(Mode):
    """The modes that form matrices, solved by PCR (plain or chunked) in every runtime. Each gives the
    products the algorithms are written in: ``apply``, ``compose``, ``transpose``, ``unit``; for the
    chunked sweep (vectors as ``columns``) ``apply_add_``, ``compose_into``, ``add_applied_``; for the
    compiled scan ``fused_apply``, ``fused_compose``."""

    linearised = True
    matrix_dims = 1  # trailing dimensions of one A_l beyond (B, ...): 2 dense, 1 diagonal

    def map_numel(self, batch: int, width: int) -> int:
        return batch * width ** self.matrix_dims

    def map_shape(self, batch: int, width: int) -> tuple:
        return (batch,) + (width,) * self.matrix_dims

    def scan_terms(self, N, SB, JB, R, K=None) -> dict:
        launches = 8 * K + 10 * R + 20 if K is not None else 10 * R + 5
        return dict(launches=launches, **self._scan_products(N, SB, JB, R, K))

    def _scan_products(self, N, SB, JB, R, K) -> dict:
        raise NotImplementedError


class Full(_Linearised):
    """Dense per-sample Jacobians: exact Newton."""

    name, exact, matrix_dims = "full", True, 2

    def structure(self, jacobian: torch.Tensor) -> torch.Tensor:
        return jacobian.contiguous()

    def apply(self, A: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``A_l v_l`` per row: A (..., n, n), v (..., n)."""
        return (A @ v.unsqueeze(-1)).squeeze(-1)

    def compose(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """``A_l B_l`` per row (the map B, then A)."""
        return A @ B

    def transpose(self, A: torch.Tensor) -> torch.Tensor:
        return A.transpose(-1, -2)

    def unit(self, batch: int, width: int, like: torch.Tensor) -> torch.Tensor:
        return torch.eye(width, dtype=like.dtype, device=like.device).expand(batch, width, width)

    # the chunked sweep's in-place forms: vectors there are columns (..., n, 1), as bmm takes them
    def columns(self, r: torch.Tensor) -> torch.Tensor:
        return r.unsqueeze(-1)

    def vectors(self, r: torch.Tensor) -> torch.Tensor:
        return r.squeeze(-1)

    def apply_add_(self, out: torch.Tensor, A: torch.Tensor, v: torch.Tensor) -> None:
        """``out += A v`` in place, 3-d batches of columns."""
        out.baddbmm_(A, v)

    def compose_into(self, A: torch.Tensor, B: torch.Tensor, out: torch.Tensor) -> None:
        """``out = A B``, 3-d batches."""
        torch.bmm(A, B, out=out)

    def add_applied_(self, out: torch.Tensor, A: torch.Tensor, x: torch.Tensor) -> None:
        """``out += A x`` in place, broadcasting: ``out`` columns, ``x`` vectors."""
        out += A @ x.unsqueeze(-1)

    # the compiled scan's forms: small-n products as a broadcast and a sum, which inductor fuses
    def fused_apply(self, A: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (A * v.unsqueeze(-2)).sum(-1)

    def c_products(self, n: int) -> dict:
        """``cscan``'s C++ for one sample's blocks (N = n): ``y = r + a x`` and ``c = ao ae``."""
        return dict(a_numel=n * n,
                    apply="T acc[N] = {}; for (int q = 0; q < N; ++q) for (int p = 0; p < N; ++p) "
                          "acc[p] += a[p * N + q] * x[q]; for (int p = 0; p < N; ++p) y[p] = r[p] + acc[p];",
                    compose="for (int p = 0; p < N; ++p) { T acc[N] = {}; for (int k = 0; k < N; ++k) "
                            "for (int q = 0; q < N; ++q) acc[q] += ao[p * N + k] * ae[k * N + q]; "
                            "for (int q = 0; q < N; ++q) c[p * N + q] = acc[q]; }")

    def fused_compose(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return (A.unsqueeze(-1) * B.unsqueeze(-3)).sum(-2)

    def _scan_products(self, N, SB, JB, R, K) -> dict:
        if K is not None:
            return dict(matmuls=N + N * R / K, matvecs=2 * N + N * R / K, bytes=4 * JB + 4 * SB)
        return dict(matmuls=N * R, matvecs=N * R, bytes=R * (4 * JB + 3 * SB))


class Diag(_Linearised):
    """The Jacobians' diagonals: quasi-Newton, elementwise products."""

    name = "diag"

    def structure(self, jacobian: torch.Tensor) -> torch.Tensor:
        return torch.diagonal(jacobian, dim1=-2, dim2=-1).contiguous()

    def apply(self, A: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return A * v

    def compose(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return A * B

    def transpose(self, A: torch.Tensor) -> torch.Tensor:
        return A

    def unit(self, batch: int, width: int, like: torch.Tensor) -> torch.Tensor:
        return like.new_ones(batch, width)

    def columns(self, r: torch.Tensor) -> torch.Tensor:
        return r

    def vectors(self, r: torch.Tensor) -> torch.Tensor:
        return r

    def apply_add_(self, out: torch.Tensor, A: torch.Tensor, v: torch.Tensor) -> None:
        out.addcmul_(A, v)

    def compose_into(self, A: torch.Tensor, B: torch.Tensor, out: torch.Tensor) -> None:
        torch.mul(A, B, out=out)

    def add_applied_(self, out: torch.Tensor, A: torch.Tensor, x: torch.Tensor) -> None:
        out.addcmul_(A, x)

    def fused_apply(self, A: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return A * v

    def fused_compose(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return A * B

    def c_products(self, n: int) -> dict:
        return dict(a_numel=n, apply="for (int p = 0; p < N; ++p) y[p] = r[p] + a[p] * x[p];",
                    compose="for (int p = 0; p < N; ++p) c[p] = ao[p] * ae[p];")

    def _scan_products(self, N, SB, JB, R, K) -> dict:
        return dict(bytes=12 * SB) if K is not None else dict(bytes=7 * R * SB)


class Identity(Mode):
    """A = I: Picard iteration; the recurrence is a cumulative sum."""

    name = "identity"

    def closed_scan(self, r: torch.Tensor, transpose: bool = False, copy: bool = True) -> torch.Tensor:
        return r.flip(0).cumsum(0).flip(0) if transpose else r.cumsum(0)

    def closed_reduce(self, r: torch.Tensor) -> torch.Tensor:
        return r.sum(0)


class Zero(Mode):
    """A = 0: Jacobi fixed-point iteration; delta = r, rows independent."""

    name, couples = "zero", False

    def closed_scan(self, r: torch.Tensor, transpose: bool = False, copy: bool = True) -> torch.Tensor:
        return r.clone() if copy else r


FULL, DIAG, IDENTITY, ZERO = Full(), Diag(), Identity(), Zero()
_BY_NAME = {m.name: m for m in (FULL, DIAG, IDENTITY, ZERO)}
NAMES = tuple(_BY_NAME)


def mode_of(mode: Union[str, Mode]) -> Mode:
    """The mode object for a name (``"full"``, ``"diag"``, ``"identity"``, ``"zero"``); a Mode is returned as is."""
    if isinstance(mode, Mode):
        return mode
    try:
        return _BY_NAME[mode]
    except (KeyError, TypeError):
        raise InvalidInput(f"unknown Jacobian mode {mode!r}: one of {NAMES}") from None


def choose_mode(requested: str, width: int, full_max_state: int, rows: Optional[int] = None) -> str:
    """Resolve ``jacobian="auto"``: ``full`` up to ``full_max_state`` (64) elements per sample, and
    up to ``FULL_MAX_ELEMENTS`` Jacobian elements for all ``rows`` (L * B) together; else ``identity``.

    Arguments:
        requested: ``Config.jacobian``: ``"auto"``, or a mode's name, which is returned unchanged.
        width: n, the state's elements per sample.
        full_max_state: ``Config.full_max_state``, the widest state ``auto`` gives full Jacobians.
        rows: L * B, the Jacobians formed at once; None to decide on the width alone.

    Returns:
        The mode's name: ``"full"``, ``"diag"``, ``"identity"`` or ``"zero"`` (``mode_of`` gives the object).

    The evidence behind it is ``benchmarks/jacobian_modes.py`` (L=256, B=4, one CPU thread;
    results in ``benchmarks/results/jacobian_modes_tanh_cpu.csv`` and ``..._residual_cpu.csv``):

    - Only ``full`` converged on every non-residual chain (tanh MLP, gain 1): 8-10 Newton
      iterations for n <= 32, 29 at n = 64. ``diag`` hit max_iter at every width and
      ``identity`` (Picard) diverged to NaN at every width, so below the threshold the
      exact Jacobian is worth its cost.
    - ``full`` costs n Jacobian passes and O(n^3) per step and scan round, so its iterations
      grow steeply with n while an ``identity`` iteration stays cheap. Beyond 64 elements the
      dense Jacobian is too expensive to win, and ``identity`` is the mode that still
      converges quickly where chains are near the identity (residual blocks with small
      updates, diffusion samplers); elsewhere the solve finishes sequentially within
      ``max_iter`` (exact) and the compiler's cost model keeps such chains sequential.

    The memory bound: a 1000-step sampler with a 64-dim latent and 64 samples would hold
    1000 * 64 * 64^2 = 262M Jacobian elements (1 GB in float32, and the scan copies it).
    """
    if requested != "auto":
        return requested
    if rows is not None and rows * width * width > FULL_MAX_ELEMENTS:
        return IDENTITY.name
    return FULL.name if width <= full_max_state else IDENTITY.name
