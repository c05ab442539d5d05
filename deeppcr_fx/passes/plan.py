"""``ChainPlan``: what the passes learn about one candidate chain, as a typed record.

The analyses travel with the graph they describe: shape propagation writes each node's
``node.meta["pcr"]`` (``shape_prop.ValueInfo``) and the graph's ``gm.meta[SHAPES]``
(``shape_prop.ShapeInfo``); finding chains writes ``gm.meta[PLANS]``, one ``ChainPlan`` per
candidate, which the later passes fill in, each its own fields:

    find_chains   candidate
    validate      template (slots + one-step graph, built once), refusal, mode
    decide        shape, prediction, refusal (the policy), decision
    describe      record (the report's ``ChainRecord``, from the graph as analysed)
    rewrite       submodule (the ``PCRSolve`` the chain became)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch.fx as fx

from ..results import Refusal
from .find_chains import Candidate
from .template import StepTemplate

PLANS = "deeppcr_plans"
SHAPES = "deeppcr_shapes"


@dataclass
class ChainPlan:
    candidate: Candidate
    template: Optional[StepTemplate] = None
    refusal: Optional[Refusal] = None
    mode: str = ""  # the Jacobian mode the solver will use (Config.jacobian resolved for this state)
    validated: bool = False
    shape: Any = None  # step_profile.ChainShape: the cost model's view of the chain
    prediction: Any = None  # cost_model.Prediction
    decision: str = ""  # why it is rewritten or kept sequential, in words
    decided: bool = False
    record: Any = None  # inspect.report.ChainRecord
    submodule: Optional[str] = None

    @property
    def accepted(self) -> bool:
        return self.decided and self.refusal is None


def plans_of(gm: fx.GraphModule) -> list:
    """The chain plans the passes wrote on ``gm`` (empty before ``find_chains`` ran)."""
    return gm.meta.get(PLANS, [])
