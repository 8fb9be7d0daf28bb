"""Adaptive screen-and-refine: a cheap screen (atp, csb or css) ranks every head; exact, batched iterative
greedy restricted to the screen's top `n_candidates` then picks the k heads by the objective's criterion.

The screen's errors (a first-order gradient, or a sparse regression under interacting heads) only cost a
candidate slot; every head reported was chosen by exact ablation. With `n_candidates` = all heads this is
plain iterative greedy.

With the gradient screen (atp) the screen is adaptive: before each greedy round after the first, the gradient
is taken again with the heads already chosen held at 0, so the next round's candidates are the heads that
matter *given* that ablation (iterative greedy's second and later picks are often heads whose effect only
shows once the first is gone: backups and heads downstream of it), joined by the best `n_candidates // 4`
of the previous round's exact order. One forward + backward pass per round on top of the masks.

`passes` > 0 then improves the greedy set by exact swaps (`methods.exchange`), each proposed by the gradient
at the current set (the gradient screen) or by the screen's single-head estimates (a regression screen).
"""

from __future__ import annotations

import numpy as np

from caploc.methods.attribution import AttributionPatching
from caploc.methods.base import Method, MethodResult, NotEvaluated, Objective
from caploc.methods.exchange import DEFAULT_SWAPS, exchange
from caploc.methods.greedy import Greedy


class ScreenRefine(Method):
    name = "refine"

    def __init__(self, screen: Method, n_candidates: int = 16, passes: int = 0,
                 n_swaps: int = DEFAULT_SWAPS):
        self.screen = screen
        self.n_candidates = n_candidates
        self.passes = passes
        self.n_swaps = n_swaps

    def params(self) -> dict:
        return {"screen": self.screen.name, "n_candidates": self.n_candidates, "exchange_passes": self.passes,
                "exchange_swaps": self.n_swaps, **{f"screen_{k}": v for k, v in self.screen.params().items()}}

    def for_replay(self, details: dict) -> "ScreenRefine":
        return ScreenRefine(self.screen.for_replay(details["screen"]), self.n_candidates, self.passes,
                            self.n_swaps)

    def run(self, objective: Objective, k: int) -> MethodResult:
        screened = self.screen.run(objective, k)
        candidates = screened.ranking[: max(k, self.n_candidates)]
        adaptive = isinstance(self.screen, AttributionPatching)
        if adaptive:
            refined = _RescreenedGreedy(candidates, self.n_candidates).run(objective, k)
        else:
            refined = Greedy(candidates).run(objective, k)
        exact = np.isfinite(refined.head_scores)
        # exact single-head measurements where refine made them, the screen's estimates elsewhere
        head_scores = np.where(exact, refined.head_scores, np.nan)
        measured = exact if refined.target_effects is None else np.isfinite(refined.target_effects)
        target = np.where(measured, refined.target_effects, screened.target_effects
                          if screened.target_effects is not None else np.nan)
        control = None
        if refined.control_effects is not None:
            control = np.where(exact, refined.control_effects, screened.control_effects
                               if screened.control_effects is not None else np.nan)
        rounds = refined.details["rounds"]
        chosen = [r["head"] for r in rounds]
        exchanges = []
        if self.passes and len(chosen) == k:
            if adaptive:  # the gradient taken at the set
                marginals = objective.estimated_drops
            else:  # the regression's single-head estimates, the same on top of any set
                def marginals(_chosen):
                    return screened.target_effects, screened.control_effects
            chosen, exchanges = exchange(objective, chosen, rounds[-1]["cumulative_drop"],
                                         rounds[-1].get("cumulative_control_drop"), self.passes, self.n_swaps,
                                         marginals)
        ranking = chosen + [i for i in screened.ranking if i not in chosen]
        details = {"candidates": candidates, "rounds": rounds, "exchanges": exchanges,
                   # forward + backward passes of the gradient screen: the first, one per later round, one
                   # per exchange pass
                   "gradient_points": len(rounds) + len(exchanges) if adaptive else 0,
                   "screen": {"name": self.screen.name, "score_name": screened.score_name,
                              "head_scores": np.asarray(screened.head_scores).tolist(),
                              **{k: v for k, v in screened.details.items()
                                 if k in ("r2", "alpha", "control_alpha", "control_r2", "warning")}}}
        return MethodResult(ranking=ranking, head_scores=head_scores, score_name=refined.score_name + " (candidates)",
                            details=details, target_effects=target, control_effects=control)


class _RescreenedGreedy(Greedy):
    """Greedy whose candidates after round 1 are the gradient's top heads at the current ablation, plus the
    best few of the previous round's exact order."""

    def __init__(self, first: list[int], n_candidates: int):
        super().__init__(first)
        self.n_candidates = n_candidates

    def pool(self, objective: Objective, chosen: list[int], last_order: list[int],
             last_round: dict | None) -> list[int]:
        if not chosen:
            return list(self.candidates)
        try:
            target, control = objective.estimated_drops(chosen)
        except NotEvaluated:  # a bootstrap replay off the run's path: whatever the run evaluated decides
            return list(range(objective.n_heads))
        # the criterion is not linear in the drops (its target share saturates): rank each candidate at the
        # point it would reach, the chosen set's exact drops plus its estimated marginal ones
        target = target + last_round["cumulative_drop"]
        if control is not None:
            control = control + last_round["cumulative_control_drop"]
        scores = objective.specificity(target, control)
        scores[chosen] = -np.inf
        nominated = [int(i) for i in np.argsort(-scores, kind="stable")[: self.n_candidates]]
        kept = [i for i in last_order if i not in chosen][: max(1, self.n_candidates // 4)]
        return kept + [i for i in nominated if i not in kept]
