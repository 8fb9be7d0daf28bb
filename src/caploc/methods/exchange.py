"""Exchange: after greedy's k picks, swap one chosen head for an unchosen one while that robustly raises the
criterion.

Greedy adds one head at a time and never revisits a pick, so it stops at sets whose heads only pay off
together, and which set it stops at depends on the identification items' noise. A swap moves between such
sets one head at a time.

Each pass costs k exact leave-one-out masks (the chosen set without each head), one set of marginal estimates
at the full set (the gradient there, or a regression screen's single-head effects) and `n_swaps` exact swap
masks: the estimate of swapping h for j is the exact drop without h plus j's estimated marginal drop, and the
`n_swaps` best estimates are evaluated exactly (controls only where the target alone could beat the current
set). The best exact swap is kept only if it raises the criterion in CONFIDENCE of RESAMPLES bootstrap
resamples of the identification items (stored per-item scores, no model call): a swap that is better on the
mean but not across resamples fits the items' noise, and the swap tested is the best of `n_swaps`, which
inflates its support, so the bar is high (docs/results.md has what lower bars did). What each pass proposed
and its support is recorded and printed: the closest competitor of the chosen set. The passes stop at the
first one that keeps nothing.

A bootstrap replay (no gradient at a point the run never reached) tries every swap whose mask the run
evaluated; its resamples of the resample are drawn uniformly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import numpy as np

from caploc.methods.base import NotEvaluated, Objective
from caploc.methods.greedy import bounded_effects
from caploc.params import Param

IMPROVEMENT = 1e-9  # a swap must raise the criterion by more than rounding to be taken (no cycling on ties)
RESAMPLES = 200  # bootstrap resamples of the identification items that decide whether a swap is kept
CONFIDENCE = 0.95  # the share of them in which it must raise the criterion
DEFAULT_SWAPS = 8  # swaps a pass evaluates exactly: the best estimates
DEFAULT_EXCHANGE = 1  # passes after a search: one tests the set against its closest competitors
# the parameters of the methods that end with exchange passes (refine, joint), declared once
PASSES = Annotated[int, Param(f"refine, joint: passes of exact head swaps after the search (a swap is kept only if "
                              f"it raises the criterion in {CONFIDENCE:.0%} of bootstrap resamples of the items; 0 "
                              f"for none)", flag="--exchange")]
SWAPS = Annotated[int, Param("refine, joint: swaps each exchange pass evaluates exactly", flag="--swaps")]


Marginals = Callable[[list[int]], tuple[np.ndarray, "np.ndarray | None"]]


def exchange(objective: Objective, chosen: list[int], target: float, control: float | None, passes: int,
             n_swaps: int, marginals: Marginals) -> tuple[list[int], list[dict]]:
    """Up to `passes` improving swaps of the set `chosen` (exact drops `target`, `control`); `marginals(set)`
    estimates every head's drops on top of a set (target, control damage). Returns the new set (a swapped-in
    head takes the swapped-out head's place) and one record per pass."""
    chosen = list(chosen)
    current = set_criterion(objective, target, control)
    records = []
    for _ in range(passes):
        swaps = _proposals(objective, chosen, n_swaps, marginals)
        if not swaps:
            break
        sets = [[j if c == h else c for c in chosen] for h, j in swaps]
        masks = objective.set_masks(sets)
        known = objective.evaluated(masks)
        swaps = [s for s, ok in zip(swaps, known) if ok]
        if not swaps:
            break
        scores, drops, control_drops = bounded_effects(objective, masks[known], best=current)
        record = {"tried": len(swaps), "criterion_before": current}
        best = int(np.nanargmax(scores)) if not np.isnan(scores).all() else None
        if best is None or scores[best] <= current + IMPROVEMENT:
            records.append(record | {"swap": None})
            break
        out, into = swaps[best]
        swapped = [into if c == out else c for c in chosen]
        share = support(objective, chosen, swapped, seed=len(records))
        record |= {"proposed": [out, into], "support": share}
        if share < CONFIDENCE:  # better on these items, but not robustly: item noise, not a better set
            records.append(record | {"swap": None})
            break
        chosen = swapped
        current = float(scores[best])
        records.append(record | {"swap": [out, into], "criterion": current,
                                 "cumulative_drop": float(drops[best])}
                       | ({"cumulative_control_drop": float(control_drops[best])}
                          if control_drops is not None else {}))
    return chosen, records


def set_criterion(objective: Objective, target: float, control: float | None) -> float:
    """The criterion of one set from its exact drops (target, control damage)."""
    return float(objective.specificity(np.array([target]), None if control is None else np.array([control]))[0])


def support(objective: Objective, before: list[int], after: list[int], seed: int) -> float:
    """The share of bootstrap resamples of the identification items (stored per-item scores: no model call) in
    which the set `after` has a higher criterion than `before`."""
    masks = objective.set_masks([before, after])
    rng = np.random.default_rng(seed)
    wins = 0
    for _ in range(RESAMPLES):
        score = objective.resampled(rng).criterion(masks)
        wins += bool(score[1] > score[0])
    return wins / RESAMPLES


def _proposals(objective: Objective, chosen: list[int], n_swaps: int,
               marginals: Marginals) -> list[tuple[int, int]]:
    """The (out, in) swaps worth an exact evaluation, best estimate first."""
    others = [j for j in range(objective.n_components) if j not in chosen]
    if not others:
        return []
    try:
        marginal, marginal_control = marginals(chosen)
        loo_target, loo_control = objective.responses(
            objective.set_masks([[c for c in chosen if c != h] for h in chosen]))
    except NotEvaluated:  # a replay off the run's path: every swap the run evaluated (stored, no model call)
        return [(h, j) for h in chosen for j in others]
    estimate_target = loo_target[:, None] + marginal[None, others]
    estimate_control = None if loo_control is None else loo_control[:, None] + marginal_control[None, others]
    estimate = objective.specificity(estimate_target, estimate_control).reshape(-1)
    order = np.argsort(-estimate, kind="stable")[:n_swaps]
    return [(chosen[int(i) // len(others)], others[int(i) % len(others)]) for i in order]
