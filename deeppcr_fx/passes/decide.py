"""The policy: which valid chains are rewritten.

For every chain that validation accepted (and the too-short ones, whose estimate the report
still shows) the cost model predicts sequential and parallel time (``step_profile`` ->
``cost_model.predict``, priced by ``calibrate``). Then: ``policy="never"`` refuses every chain,
``"auto"`` refuses those predicted below ``cost_model.MARGIN``, ``"always"`` keeps them all;
autotuning's measured choices (``CompileOptions.forced``) override the prediction. Each plan
gets its refusal (or none) and its decision in words.
"""
from __future__ import annotations

from typing import Optional

import torch.fx as fx

from ..results import Reason, Refusal
from .calibrate import constants_for
from .cost_model import predict
from .options import CompileOptions
from .plan import ChainPlan
from .step_profile import profile


def decide(plans: list, gm: fx.GraphModule, options: CompileOptions) -> None:
    """Fill in ``shape``, ``prediction``, ``refusal`` and ``decision`` of every plan."""
    constants = None
    for i, plan in enumerate(plans):
        refusal = plan.refusal
        if refusal is None or refusal.reason is Reason.TOO_SHORT:
            plan.shape = profile(plan.candidate, gm, options.config, options.device_type, options.backward)
            if plan.shape is not None:
                constants = constants or constants_for(options.device_type, options.device_index)
                plan.prediction = predict(plan.shape, constants)
        if refusal is None:
            plan.refusal = _policy(i, plan, options)
        plan.decision = _decision(i, plan, options)
        plan.decided = True


def _policy(i: int, plan: ChainPlan, options: CompileOptions) -> Optional[Refusal]:
    policy = options.config.policy
    if options.autocast:
        return Refusal(Reason.AUTOCAST, "torch.autocast is on for these inputs")
    if policy == "never":
        return Refusal(Reason.POLICY_NEVER)
    if i in options.forced:
        parallel, why = options.forced[i]
        return None if parallel else Refusal(Reason.NOT_PROFITABLE, why)
    prediction = plan.prediction
    if policy == "auto" and (prediction is None or not prediction.profitable()):
        return Refusal(Reason.NOT_PROFITABLE, prediction.describe() if prediction else "no cost estimate")
    return None


def _decision(i: int, plan: ChainPlan, options: CompileOptions) -> str:
    if plan.refusal is not None:
        return f"kept sequential: {plan.refusal}"
    policy = options.config.policy
    if i in options.forced:
        return f"rewritten (policy='{policy}', autotune): {options.forced[i][1]}"
    if policy == "auto" and plan.prediction is not None:
        return f"rewritten (policy='auto'): {plan.prediction.describe()}"
    return f"rewritten (policy='{policy}'): every valid chain of >= min_length={options.config.min_length} steps"
