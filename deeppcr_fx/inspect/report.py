"""What ``deeppcr.compile`` did, as data: chains found, rewritten and refused, with reasons.

``CompileReport``, ``ChainRecord`` and ``InputRecord`` are plain dataclasses:
``to_dict()`` is JSON-serialisable and ``from_dict`` reads it back (``from_dict(r.to_dict())
== r``; the graph history comes back as names only). ``str(report)`` renders a table through
``inspect.render``; nothing here formats text.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

from ..results import COEFFICIENT, PER_STEP, REFUSED, REWRITTEN, SHARED, Reason


def _tuple(x):
    return None if x is None else tuple(x)


@dataclass(frozen=True)
class InputRecord:
    """One value a step reads besides the state: how the solve receives it."""

    kind: str  # PER_STEP, SHARED or COEFFICIENT
    first: str  # the node the first step reads (the node itself for SHARED)
    last: str  # the node the last step reads
    # "parameter", "buffer", "constant" (a tensor traced from Python, e.g. a schedule coefficient),
    # "input" (a graph input), "computed" (state-independent ops) or "attribute"
    source: str
    shape: Optional[tuple]  # one step's shape (None when not a tensor)
    dtype: str
    hoisted: bool = False  # computed outside the state-dependent core of a step and kept out of the solve

    def to_dict(self) -> dict:
        return {"kind": self.kind, "first": self.first, "last": self.last, "source": self.source,
                "shape": None if self.shape is None else list(self.shape), "dtype": self.dtype,
                "hoisted": self.hoisted}

    @classmethod
    def from_dict(cls, d: dict) -> "InputRecord":
        return cls(kind=d["kind"], first=d["first"], last=d["last"], source=d["source"], shape=_tuple(d["shape"]),
                   dtype=d["dtype"], hoisted=d.get("hoisted", False))


@dataclass
class ChainRecord:
    """One chain the compiler found, and what became of it."""

    index: int
    front_end: str
    graph: int  # which captured graph (TorchDynamo may hand over several)
    state: str  # the node the chain starts from (its initial state)
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
    end: str = ""  # the node holding the chain's final state (in the graph as analysed)
    inputs: tuple = ()  # InputRecord per value the steps read besides the state
    decision: str = ""  # why it was rewritten or kept sequential (policy, cost estimate)
    cost: dict = field(default_factory=dict)  # estimates behind the decision (depths, predicted speed-up)

    @property
    def remedy(self) -> str:
        return "" if self.reason is None else self.reason.remedy

    @property
    def start_module(self) -> str:
        return self.covers[0] if self.covers else ""

    @property
    def end_module(self) -> str:
        return self.covers[-1] if self.covers else ""

    @property
    def per_step_inputs(self) -> list:
        return [i for i in self.inputs if i.kind in (PER_STEP, COEFFICIENT)]

    @property
    def shared_inputs(self) -> list:
        return [i for i in self.inputs if i.kind == SHARED]

    @property
    def hoisted_inputs(self) -> list:
        return [i for i in self.inputs if i.hoisted]

    def to_dict(self) -> dict:
        return {
            "index": self.index, "front_end": self.front_end, "graph": self.graph, "state": self.state,
            "end": self.end, "start_module": self.start_module, "end_module": self.end_module,
            "state_shape": None if self.state_shape is None else list(self.state_shape), "dtype": self.dtype,
            "length": self.length, "period": self.period, "replaced": list(self.replaced),
            "covers": list(self.covers), "n_per_step": self.n_per_step, "n_shared": self.n_shared,
            "inputs": [i.to_dict() for i in self.inputs], "jacobian": self.jacobian, "status": self.status,
            "reason": None if self.reason is None else self.reason.value, "detail": self.detail,
            "remedy": self.remedy, "decision": self.decision, "cost": dict(self.cost), "submodule": self.submodule,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ChainRecord":
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in names}
        values.update(state_shape=_tuple(d.get("state_shape")), replaced=tuple(d.get("replaced", ())),
                      covers=tuple(d.get("covers", ())), inputs=tuple(InputRecord.from_dict(i) for i in d.get("inputs", ())),
                      reason=None if d.get("reason") is None else Reason(d["reason"]), cost=dict(d.get("cost", {})))
        return cls(**values)


@dataclass
class CompileReport:
    """The result of compiling one model for one input signature."""

    model: str
    policy: str
    signature: str = ""
    front_end: Optional[str] = None  # "symbolic", "record", "dynamo", or None when nothing could trace the model
    chains: list = field(default_factory=list)
    opaque_modules: dict = field(default_factory=dict)  # module path -> why its forward stayed opaque
    # the graph after each pass, in order: "capture" (as the front end captured it), then one entry per
    # pipeline pass (passes that change nothing share their predecessor's GraphModule); the last entry is
    # the emitted graph. A report read back by ``from_dict`` has the names only (values None).
    graphs: dict = field(default_factory=dict, compare=False)
    captured: int = 0  # how many graphs the front end captured (TorchDynamo may hand over several)
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
            "captured": self.captured, "graphs": list(self.graphs), "chains": [c.to_dict() for c in self.chains],
            "opaque_modules": dict(self.opaque_modules),
            "failure": None if self.failure is None else self.failure.value, "failure_detail": self.failure_detail,
            "failure_remedy": None if self.failure is None else self.failure.remedy, "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "CompileReport":
        """The report ``to_dict`` wrote (``graphs`` maps each pass name to ``None``)."""
        return cls(model=d["model"], policy=d["policy"], signature=d.get("signature", ""),
                   front_end=d.get("front_end"), chains=[ChainRecord.from_dict(c) for c in d.get("chains", ())],
                   opaque_modules=dict(d.get("opaque_modules", {})),
                   graphs={name: None for name in d.get("graphs", ())}, captured=d.get("captured", 0),
                   failure=None if d.get("failure") is None else Reason(d["failure"]),
                   failure_detail=d.get("failure_detail", ""), notes=list(d.get("notes", ())))

    def __str__(self) -> str:
        from .render import render_report

        return render_report(self)
