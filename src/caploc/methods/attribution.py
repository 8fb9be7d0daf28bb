"""Attribution patching (AtP; Kramar et al. 2024, "AtP*"; the head-gate gradient of Michel et al. 2019): the
gradient of the identification metric with respect to every head's multiplier at 1 is a first-order estimate
of each head's ablation drop, for all heads at once from one forward + backward pass per batch of items.

It is a screen, not a verdict: it is exact only where the metric is linear in a head's multiplier, and misses
effects that appear only when a head is fully removed (saturated softmaxes downstream, heads that cancel or
back each other up). AtP*'s attention-pattern fix does not apply here (the multiplier gates a head's output,
not its attention scores); what caploc does instead is use AtP to nominate candidates that exact ablation
then decides (`refine`), and `bench/locate_quality.py` measures its agreement with the exact sweep.
"""

from __future__ import annotations

import numpy as np

from caploc.methods.base import Method, MethodResult, Objective, register_method


@register_method("atp")
class AttributionPatching(Method):
    """Attribution patching: each head's ablation effect estimated from the gradient, one forward + backward
    pass for all heads."""

    name = "atp"

    def run(self, objective: Objective, k: int) -> MethodResult:
        target, control = objective.estimated_drops()
        scores = objective.specificity(target, control)
        ranking = [int(i) for i in np.argsort(-scores, kind="stable")]
        details = {"estimated_drops": target.tolist()}
        if control is not None:
            details["estimated_control_drops"] = control.tolist()
        return MethodResult(ranking=ranking, head_scores=scores,
                            score_name="estimated specificity (gradient)" if control is not None
                            else "estimated drop (gradient)",
                            details=details, target_effects=target, control_effects=control)
