"""What one solve did: iterations, residuals, windows and sequential finishes, as data."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from ..results import FinishCause


@dataclass
class PassStats:
    """One Newton (forward) or adjoint (backward) iteration loop."""

    iterations: int = 0
    residuals: list = field(default_factory=list)  # max over steps of |delta| / (atol + rtol |z|)
    window_starts: list = field(default_factory=list)  # first unconverged step before each iteration
    converged: bool = False  # True when every step met the tolerance without a sequential finish
    sequential_finish: Optional[FinishCause] = None
    sequential_from: Optional[int] = None  # first step computed by the sequential finish
    jacobian: str = ""
    prefix: int = 0  # leading steps computed sequentially until they met a warm start's guess
    guess_met: Optional[bool] = None  # whether that prefix met the guess (None: no warm start)
    backend: str = "eager"  # "inductor": the iterations ran as one compiled function (runtime/fused.py)
    # how the compiled backend's sequential finish ran: "cloop" (one generated C++ loop, runtime/cloop.py),
    # "inductor" (compiled chunks of steps) or "eager"; why the C++ loop was not used, if it was not
    finish_backend: Optional[str] = None
    finish_error: Optional[str] = None
    # how the compiled backend's forward iteration formed the steps and Jacobians: "rows" (one generated C++
    # loop over the rows, runtime/rowloop.py) or "inductor" (inside the iteration's graph); why not "rows"
    linearise_backend: Optional[str] = None
    linearise_error: Optional[str] = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sequential_finish"] = None if self.sequential_finish is None else self.sequential_finish.value
        return d


@dataclass
class SolveStats:
    """Telemetry of one ``deeppcr.solve`` call (the backward fills ``backward`` when it runs)."""

    length: int
    width: int
    batch_size: int
    jacobian_requested: str
    jacobian: str
    dtype: str
    compute_dtype: str
    vectorized: bool = True
    vmap_error: Optional[str] = None  # why steps were evaluated in a per-step loop, if they were
    # how Jacobians were formed: "replicated" (one pullback on a replicated batch), "rev" (vmap'd vjp
    # rows) or "fwd" (jvp columns); see runtime/jacobians.py
    autodiff: str = "rev"
    autodiff_error: Optional[str] = None  # why reverse mode was abandoned, if it was
    replicate_error: Optional[str] = None  # why the replicated batch was abandoned, if it was
    warm_start: bool = False  # Newton started from the previous call's solution
    # which runtime ran the forward iterations: "eager" or "inductor" (the compiled iteration,
    # runtime/fused.py); why the compiled one was not used where it was asked for; seconds this solve
    # spent tracing and compiling (None: it compiled nothing)
    backend: str = "eager"
    backend_error: Optional[str] = None
    compile_s: Optional[float] = None
    forward: PassStats = field(default_factory=PassStats)
    backward: Optional[PassStats] = None

    @property
    def iterations(self) -> int:
        return self.forward.iterations

    @property
    def residuals(self) -> list:
        return self.forward.residuals

    @property
    def converged(self) -> bool:
        return self.forward.converged

    @property
    def sequential_finish(self) -> Optional[FinishCause]:
        return self.forward.sequential_finish

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("forward", "backward")}
        d["forward"] = self.forward.to_dict()
        d["backward"] = None if self.backward is None else self.backward.to_dict()
        return d

    def __str__(self) -> str:
        f = self.forward
        how = "converged" if f.converged else f"sequential finish from step {f.sequential_from} ({f.sequential_finish.value})"
        return (f"solve L={self.length} n={self.width} B={self.batch_size} jacobian={self.jacobian} "
                f"{self.dtype}: {f.iterations} iterations, {how}")
