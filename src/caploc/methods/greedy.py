"""Greedy search over single-head ablations (paper section 4), by the objective's criterion (the target drop,
or with a control task the specificity criterion of `methods.base`)."""

from __future__ import annotations

import numpy as np

from caploc.masks import Masks
from caploc.methods.base import Method, MethodResult, Objective, register_method


# masks whose controls a bounded round evaluates at a time: one, then twice as many up to CONTROL_BATCH (the
# first by the bound is often the choice, and a control mask can cost several target masks: `general` on
# Qwen2.5-Coder-0.5B costs 3-4 s a mask against 2D+'s 0.4-1 s)
CONTROL_BATCH = 4


def _effects(objective: Objective, masks: Masks):
    target, control = objective.responses(masks)
    return objective.specificity(target, control), target, control


def bounded_effects(objective: Objective, masks: Masks, best: float = -np.inf, keep: int = 1,
                    control: np.ndarray | None = None):
    """A greedy round keeps only the best mask by the criterion, and the criterion is at most what the target
    drop alone gives (`Objective.upper_bound`: the control only subtracts). So the controls are evaluated in
    order of that bound, a batch at a time (1, 2, then CONTROL_BATCH masks), until no remaining mask's bound
    reaches the best criterion found (or `best`, a criterion the caller already has and a mask must reach to
    matter; with `keep` > 1, the keep-th best): the round chooses what evaluating every control would choose
    (ties included), and masks left out keep a NaN control drop and criterion. A bootstrap replay skips masks
    whose controls the run did not evaluate. `control`: damages the caller already has (NaN where not), not
    asked for again."""
    target = objective.drops(masks)
    if not objective.has_control:
        return target.copy(), target, None
    bound = objective.upper_bound(target)
    scores = np.full(len(masks), np.nan)
    control = np.full(len(masks), np.nan) if control is None else np.array(control, dtype=np.float64)
    known = objective.evaluated(masks, control=True)
    order = [int(j) for j in np.argsort(-bound, kind="stable") if known[j]]
    first, size = 0, 1
    while first < len(order):
        batch = [j for j in order[first:first + size] if bound[j] >= best]
        first, size = first + size, min(2 * size, CONTROL_BATCH)
        if not batch:
            break
        missing = [j for j in batch if np.isnan(control[j])]
        if missing:
            control[missing] = objective.control_drops(masks[missing])
        scores[batch] = objective.specificity(target[batch], control[batch])
        found = np.sort(scores[~np.isnan(scores)])[::-1]
        if len(found) >= keep:
            best = max(best, float(found[keep - 1]))
    return scores, target, control


def _order(scores: np.ndarray, target_bound: np.ndarray) -> np.ndarray:
    """Positions by criterion, best first; those without one (controls not evaluated) after, by their bound."""
    missing = np.isnan(scores)
    return np.lexsort((-np.where(missing, target_bound, scores), missing))


@register_method("1s-greedy")
class OneShotGreedy(Method):
    """One-shot greedy (the paper's 1S-Greedy): one pass of the N single-head ablations; the k best by the
    criterion."""

    name = "1s-greedy"

    def run(self, objective: Objective, k: int) -> MethodResult:
        n = objective.n_components
        scores, target, control = _effects(objective, objective.set_masks([[i] for i in range(n)]))
        # stable order: equal scores keep head order, so the ranking is reproducible
        ranking = [int(i) for i in np.argsort(-scores, kind="stable")]
        details = {"single_head_drops": target.tolist()}
        if control is not None:
            details["single_head_control_drops"] = control.tolist()
        return MethodResult(ranking=ranking, head_scores=scores, score_name=_score_name(objective),
                            details=details, target_effects=target, control_effects=control)


@register_method("greedy")
class Greedy(Method):
    """Iterative greedy (the paper's): k rounds; each ablates every remaining head on top of those already
    chosen and keeps the best by the criterion. Round 1 is exactly one-shot greedy's sweep (shared through the
    store)."""

    name = "greedy"
    candidates: list[int] | None = None  # every head

    def pool(self, objective: Objective, chosen: list[int], last_order: list[int],
             last_round: dict | None) -> list[int]:
        """The heads a round tries on top of `chosen` (`last_order`: the previous round's exact order,
        `last_round`: its record, with the exact cumulative drops of `chosen`)."""
        return list(range(objective.n_components)) if self.candidates is None else list(self.candidates)

    def run(self, objective: Objective, k: int) -> MethodResult:
        chosen: list[int] = []
        rounds = []
        first = None
        diverged = False
        last_order: list[int] = []
        for _ in range(k):
            candidates = [i for i in self.pool(objective, chosen, last_order, rounds[-1] if rounds else None)
                          if i not in chosen]
            if not candidates:
                break
            masks = objective.set_masks([chosen + [i] for i in candidates])
            known = objective.evaluated(masks)  # a bootstrap replay answers only what the run evaluated
            if not known.any():  # the replay left the evaluated path: the rest in the last round's order
                diverged = True
                break
            candidates = [c for c, ok in zip(candidates, known) if ok]
            scores, target, control = bounded_effects(objective, masks[known])
            if np.isnan(scores).all():  # a replay whose controls the run never evaluated here
                diverged = True
                break
            order = [candidates[j] for j in _order(scores, objective.upper_bound(target))]
            if first is None:
                first = (candidates, scores, target, control)
            best = order[0]
            rounds.append({"head": best, "tried": len(candidates), "criterion": float(scores[candidates.index(best)]),
                           "cumulative_drop": float(target[candidates.index(best)])}
                          | ({"cumulative_control_drop": float(control[candidates.index(best)])}
                             if control is not None else {}))
            chosen.append(best)
            last_order = order
        if first is None:  # a replay that could evaluate nothing: the candidates in the order given
            pool = self.pool(objective, [], [], None)
            return MethodResult(ranking=pool + [i for i in range(objective.n_components) if i not in pool],
                                head_scores=np.full(objective.n_components, np.nan), score_name=_score_name(objective),
                                details={"rounds": []})
        cand, scores, target, control = first
        order = last_order if diverged else [cand[j] for j in _order(scores, objective.upper_bound(target))]
        rest = [i for i in order if i not in chosen]
        head_scores = np.full(objective.n_components, np.nan if self.candidates is not None else 0.0)
        head_scores[cand] = scores
        target_effects = np.full(objective.n_components, np.nan)
        target_effects[cand] = target
        control_effects = None
        if control is not None:
            control_effects = np.full(objective.n_components, np.nan)
            control_effects[cand] = control
        ranking = chosen + rest + [i for i in range(objective.n_components) if i not in chosen and i not in rest]
        return MethodResult(ranking=ranking, head_scores=head_scores, score_name=_score_name(objective),
                            details={"rounds": rounds}, target_effects=target_effects,
                            control_effects=control_effects)


def _score_name(objective: Objective) -> str:
    return "single-head specificity" if objective.has_control else "single-head drop"


class RestrictedGreedy(Greedy):
    """Greedy over `candidates` only (screen-and-refine's exact step)."""

    def __init__(self, candidates: list[int]):
        self.candidates = [int(i) for i in candidates]
