"""What ``deeppcr.compile`` did, as data: chains found, rewritten and refused, with reasons.

``CompileReport`` and ``ChainRecord`` are plain dataclasses (``to_dict()`` is
JSON-serialisable); ``str(report)`` renders a table through ``inspect.render``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..passes.validate import Reason

REWRITTEN = "rewritten"
REFUSED = "refused"


@dataclass
class ChainRecord:
    """One chain the compiler found, and what became of it."""

    index: int
    front_end: str
    graph: int  # which captured graph (TorchDynamo may hand over several)
    state: str  # the node the chain starts from
    state_shape: Optional[tuple]
    dtype: str
    length: int
    period: int
    replaced: tuple  # names of the graph nodes the chain covers
    covers: tuple  # the original modules (paths) it covers
    n_per_step: int
    n_shared: int
    jacobian: str  # the mode the solver will use (``Config.jacobian`` resolved for this state)
    status: str
    reason: Optional[Reason] = None
    detail: str = ""
    submodule: Optional[str] = None

    @property
    def remedy(self) -> str:
        return "" if self.reason is None else self.reason.remedy

    def to_dict(self) -> dict:
        return {
            "index": self.index, "front_end": self.front_end, "graph": self.graph, "state": self.state,
            "state_shape": None if self.state_shape is None else list(self.state_shape), "dtype": self.dtype,
            "length": self.length, "period": self.period, "replaced": list(self.replaced),
            "covers": list(self.covers), "n_per_step": self.n_per_step, "n_shared": self.n_shared,
            "jacobian": self.jacobian, "status": self.status,
            "reason": None if self.reason is None else self.reason.value, "detail": self.detail,
            "remedy": self.remedy, "submodule": self.submodule,
        }


@dataclass
class CompileReport:
    """The result of compiling one model for one input signature."""

    model: str
    policy: str
    signature: str = ""
    front_end: Optional[str] = None  # "symbolic", "dynamo", or None when nothing could trace the model
    chains: list = field(default_factory=list)
    opaque_modules: dict = field(default_factory=dict)  # module path -> why its forward stayed opaque
    graphs: int = 0
    failure: Optional[Reason] = None  # set when the model runs unchanged because it could not be traced
    failure_detail: str = ""
    notes: list = field(default_factory=list)

    @property
    def found(self) -> list:
        return list(self.chains)

    @property
    def rewritten(self) -> list:
        return [c for c in self.chains if c.status == REWRITTEN]

    @property
    def refused(self) -> list:
        return [c for c in self.chains if c.status == REFUSED]

    def reasons(self) -> list:
        return [c.reason for c in self.refused]

    def to_dict(self) -> dict:
        return {
            "model": self.model, "policy": self.policy, "signature": self.signature, "front_end": self.front_end,
            "graphs": self.graphs, "chains": [c.to_dict() for c in self.chains],
            "opaque_modules": dict(self.opaque_modules),
            "failure": None if self.failure is None else self.failure.value, "failure_detail": self.failure_detail,
            "failure_remedy": None if self.failure is None else self.failure.remedy, "notes": list(self.notes),
        }

    def __str__(self) -> str:
        from .render import render_report

        return render_report(self)
