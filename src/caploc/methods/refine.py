"""Adaptive screen-and-refine: a cheap screen (atp, csb or css) ranks every head; exact, batched iterative
greedy restricted to the screen's top `n_candidates` then picks the k heads by the objective's criterion.

The screen's errors (a first-order gradient, or a sparse regression under interacting heads) only cost a
candidate slot; every head reported was chosen by exact ablation. With `n_candidates` = all heads this is
plain iterative greedy.
"""

from __future__ import annotations

import numpy as np

from caploc.methods.base import Method, MethodResult, Objective
from caploc.methods.greedy import Greedy


class ScreenRefine(Method):
    name = "refine"

    def __init__(self, screen: Method, n_candidates: int = 16):
        self.screen = screen
        self.n_candidates = n_candidates

    def params(self) -> dict:
        return {"screen": self.screen.name, "n_candidates": self.n_candidates,
                **{f"screen_{k}": v for k, v in self.screen.params().items()}}

    def for_replay(self, details: dict) -> "ScreenRefine":
        return ScreenRefine(self.screen.for_replay(details["screen"]), self.n_candidates)

    def run(self, objective: Objective, k: int) -> MethodResult:
        screened = self.screen.run(objective, k)
        candidates = screened.ranking[: max(k, self.n_candidates)]
        refined = Greedy(candidates).run(objective, k)
        exact = np.isfinite(refined.head_scores)
        # exact single-head measurements where refine made them, the screen's estimates elsewhere
        head_scores = np.where(exact, refined.head_scores, np.nan)
        target = np.where(exact, refined.target_effects, screened.target_effects
                          if screened.target_effects is not None else np.nan)
        control = None
        if refined.control_effects is not None:
            control = np.where(exact, refined.control_effects, screened.control_effects
                               if screened.control_effects is not None else np.nan)
        chosen = [r["head"] for r in refined.details["rounds"]]
        ranking = chosen + [i for i in screened.ranking if i not in chosen]
        details = {"candidates": candidates, "rounds": refined.details["rounds"],
                   "screen": {"name": self.screen.name, "score_name": screened.score_name,
                              "head_scores": np.asarray(screened.head_scores).tolist(),
                              **{k: v for k, v in screened.details.items()
                                 if k in ("r2", "alpha", "control_alpha", "control_r2", "warning")}}}
        return MethodResult(ranking=ranking, head_scores=head_scores, score_name=refined.score_name + " (candidates)",
                            details=details, target_effects=target, control_effects=control)
