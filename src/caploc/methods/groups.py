"""Head groups: sets decided together rather than one head at a time, shared by the methods that need them.

Heads that stand in for one another (ablating one costs little while the others still write: backups, copies,
a layer's parallel heads) pay off only together, so neither greedy's one-head rounds nor a single swap reaches
them. Backward elimination does: ablate the whole group, then restore heads one at a time (by the gradient
while the group is large, then exactly), keeping the ones whose restoration would bring the capability back.

`challenge_layers` puts that to a set a search found: every layer ablated whole (one exact mask each); the
layers whose whole ablation beats the set (at most CHALLENGERS, best first) are eliminated down to the set's
size, and the best of them replaces the set when it has the higher criterion in `exchange.CONFIDENCE` of the
bootstrap resamples of the items (the rule a swap must pass). A layer mask is scored on every item only when a
first look on the leading third of them leaves it a chance of beating the set (FIRST_LOOK_Z), and, where the
controls cost less per mask than the target, when its control damage leaves it one too (`_control_allows`). With
`polish_swaps`, a best challenger that loses gets one exchange pass first and meets the set again: elimination
restores one head at a time and can keep a head whose layer-mate does the job better, which one swap mends (on
Qwen2.5-Coder-0.5B 2D+ a layer-16 challenger at criterion 0.898 lost to a set at 0.893 in 32% of the resamples;
one swap took it to 0.963).
"""

from __future__ import annotations

from typing import Annotated

import numpy as np

from caploc.methods.base import NotEvaluated, Objective
from caploc.methods.exchange import CONFIDENCE, IMPROVEMENT, exchange, set_criterion, support
from caploc.methods.greedy import bounded_effects
from caploc.params import Param
from caploc.stats import LOG_PROBABILITIES, share_removed

CHALLENGERS = 2  # layers whose heads are eliminated down to the set's size when they beat it whole
# A layer mask is first scored on the leading third of the items (at least FIRST_LOOK_ITEMS), and on every item
# only if its estimate there - the set's mean plus the mean paired difference - comes within FIRST_LOOK_Z standard
# errors of what beating the set needs (on GSM8K, 1.5B, 30 problems, it rules out 25 of 28 layers; on 0.5B 2D+, 23
# of 24).
FIRST_LOOK_ITEMS = 8
FIRST_LOOK_Z = 3.0
LAYERS = Annotated[bool, Param("refine, joint: before the swaps, every layer ablated whole challenges the set; "
                               "a layer that beats it is eliminated down to k heads (heads that stand in for one "
                               "another)", flag="--layer-challenge/--no-layer-challenge")]


def criterion_gradient(objective: Objective, multipliers: np.ndarray) -> tuple[np.ndarray, float]:
    """d criterion / d ablation amounts (s = 1 - multiplier) at `multipliers`, and the criterion there.
    Ablating more (ds = -dm) raises the target's drop by d metric / d m."""
    target, drop, controls = objective.gradients_at(multipliers)
    if not objective.has_control:
        return target, drop
    if objective.metric in LOG_PROBABILITIES:
        slope = np.exp(-drop)
    else:
        scale = abs(objective.baseline) or 1.0
        slope = np.exp(-drop / scale) / scale
    gradient = slope * target
    damage = 0.0
    for (g, v), base, metric in zip(controls, objective.control_baselines(), objective.control_metrics):
        control_drop = base - v
        if control_drop > 0:  # an improvement counts 0, its gradient too
            damage += float(share_removed(control_drop, base, metric)) / len(controls)
            c_slope = np.exp(-control_drop) if metric in LOG_PROBABILITIES else 1.0 / (abs(base) or 1.0)
            gradient = gradient - objective.penalty * c_slope * g / len(controls)
    return gradient, float(objective.target_share(np.array([drop]))[0] - objective.penalty * damage)



def prune(objective: Objective, group: list[int], target_size: int) -> tuple[list[int], list[dict]]:
    """Restore, by the gradient at the set, the cheapest half of the excess, then the rest of it (two
    gradient passes at most) until `target_size` remain."""
    records = []
    while len(group) > target_size:
        multipliers = np.ones(objective.n_components)
        multipliers[group] = 0.0
        gradient, value = criterion_gradient(objective, multipliers)
        # restoring head i (s: 1 -> 0) changes the criterion by about -gradient[i]: keep the largest
        excess = len(group) - target_size
        keep = target_size if records or excess <= 2 else len(group) - (excess + 1) // 2
        order = sorted(group, key=lambda h: -gradient[h])
        records.append({"size": len(group), "criterion_estimate": value, "restored": order[keep:]})
        group = order[:keep]
    return group, records

def eliminate(objective: Objective, group: list[int], k: int | None) -> tuple[list[int], list[dict]]:
    """Restore the head whose restoration costs the criterion least, exactly, down to k heads (None: down
    to one); the set and one record per size."""
    current = list(group)
    full, full_target, full_control = bounded_effects(objective, objective.set_masks([current]))
    curve = [{"size": len(current), "heads": list(current), "criterion": float(full[0]),
              "target_drop": float(full_target[0])}
             | ({"control_damage": float(full_control[0])} if full_control is not None else {})]
    while len(current) > (k or 1):
        masks = objective.set_masks([[h for h in current if h != out] for out in current])
        known = objective.evaluated(masks)
        if not known.any():  # a bootstrap replay off the run's path
            break
        scores, target, control = bounded_effects(objective, masks[known])
        if np.isnan(scores).all():  # a replay: the run scored none of these options' controls
            break
        options = [out for out, ok in zip(current, known) if ok]
        best = int(np.argmax(np.where(np.isnan(scores), -np.inf, scores)))
        current = [h for h in current if h != options[best]]
        curve.append({"size": len(current), "heads": list(current), "restored": options[best],
                      "criterion": float(scores[best]), "target_drop": float(target[best])}
                     | ({"control_damage": float(control[best])} if control is not None else {}))
    return current, curve


def layer_groups(objective: Objective) -> list[list[int]]:
    per_layer = objective.per_layer
    return [list(range(first, first + per_layer)) for first in range(0, objective.n_components, per_layer)]


def challenge_layers(objective: Objective, chosen: list[int], target: float, control: float | None,
                     polish_swaps: int = 0) -> tuple[list[int], float, float | None, dict | None]:
    """The set `chosen` (exact drops `target`, `control`) against every layer's best heads of its size, a
    losing best challenger polished by one exchange pass of `polish_swaps` swaps where that is > 0 (module
    docstring). Returns the set kept, its exact drops and a record (None where the objective has no layers or
    the set is a single head)."""
    per_layer, k = objective.per_layer, len(chosen)
    if not per_layer or k < 2 or per_layer <= k:
        return chosen, target, control, None
    current = set_criterion(objective, target, control)
    layers = layer_groups(objective)
    masks = objective.set_masks(layers)
    may_beat, first_look = _first_look(objective, masks, chosen, current)
    known = objective.evaluated(masks) & may_beat
    allowed, damage = _control_allows(objective, masks, known, current + IMPROVEMENT)
    known &= allowed
    scores = np.full(len(layers), np.nan)
    if known.any():
        scores[known] = bounded_effects(objective, masks[known], best=current, keep=CHALLENGERS,
                                        control=damage[known])[0]
    ahead = [int(i) for i in np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")[:CHALLENGERS]
             if np.isfinite(scores[i]) and scores[i] > current + IMPROVEMENT]
    record = {"criterion_before": current, "layer_criterion": [float(x) for x in scores], "challengers": ahead,
              "set": None, "gradient_points": 0} | ({"first_look": first_look} if first_look else {})
    best = None
    for layer in ahead:
        try:
            group, pruning = prune(objective, layers[layer], 2 * k)
            narrowed, curve = eliminate(objective, group, k)
        except NotEvaluated:  # a bootstrap replay off the run's path (another group): the run's own set stands
            continue
        record["gradient_points"] += len(pruning)
        last = curve[-1]
        if len(narrowed) == k and (best is None or last["criterion"] > best[1]["criterion"]):
            best = (narrowed, last)
    if best is None:
        return chosen, target, control, record
    narrowed, last = best
    won, share = _beats(objective, chosen, current, narrowed, last["criterion"])
    if not won and polish_swaps:
        polished, passes = exchange(objective, narrowed, last["target_drop"], last.get("control_damage"), 1,
                                    polish_swaps, objective.estimated_drops)
        record |= {"polish": passes, "gradient_points": record["gradient_points"] + len(passes)}
        if polished != narrowed:
            swap = passes[-1]
            last = {"criterion": swap["criterion"], "target_drop": swap["cumulative_drop"],
                    "control_damage": swap.get("cumulative_control_drop")}
            narrowed = polished
            won, share = _beats(objective, chosen, current, narrowed, last["criterion"])
    if share is not None:
        record |= {"proposed": narrowed, "proposed_criterion": last["criterion"], "support": share}
    if not won:
        return chosen, target, control, record
    record |= {"set": narrowed, "criterion": last["criterion"]}
    return narrowed, last["target_drop"], last.get("control_damage"), record


def _first_look(objective: Objective, masks, chosen: list[int], current: float) -> tuple[np.ndarray, dict | None]:
    """Which layer masks may beat the set (criterion `current`) by the first look on the leading items (module
    constants): a mask is ruled out when its estimate plus FIRST_LOOK_Z paired standard errors falls short of
    the target value beating the set needs (the control costing nothing). All masks may where there are too
    few items or the objective cannot look (a bootstrap replay), with no record."""
    n_items = len(objective.baseline_items)
    n = max(FIRST_LOOK_ITEMS, -(-n_items // 3))
    everything = np.ones(len(masks), dtype=bool)
    if 2 * n > n_items:
        return everything, None
    values = objective.first_look(masks, n)
    if values is None:
        return everything, None
    set_values = objective.seen_values(chosen)
    paired = values - set_values[:n]
    estimate = set_values.mean() + paired.mean(axis=1)
    error = paired.std(axis=1, ddof=1) / np.sqrt(n)
    needed = objective.values_needed(current + IMPROVEMENT)
    may_beat = estimate + FIRST_LOOK_Z * error >= needed
    return may_beat, {"items": n, "needed": float(needed), "estimate": [float(x) for x in estimate],
                      "standard_error": [float(x) for x in error],
                      "ruled_out": [int(i) for i in np.flatnonzero(~may_beat)]}


def _control_allows(objective: Objective, masks, candidates: np.ndarray,
                    needed: float) -> tuple[np.ndarray, np.ndarray]:
    """Which of the `candidates` masks may still reach criterion `needed` once their control damage is known,
    and the damages scored (NaN where none was):
    where the controls cost fewer tokens per mask than the target, they are scored first, and a mask whose
    damage alone keeps its criterion below `needed` (its target share is at most 1) is never scored on the
    target. Exact: every mask that could beat the set is still scored. On GSM8K (1.5B, 8-shot) layers 0 and 1
    removed 97% of the answers and as much of `general`; their target masks cost 65 s each, their controls 8 s.
    All masks may where there are no controls, or the controls cost more."""
    allowed, damage = np.ones(len(masks), dtype=bool), np.full(len(masks), np.nan)
    target_cost = objective.evaluator.tokens_per_mask()
    control_cost = [c.tokens_per_mask() for c in objective.controls]
    if (not objective.has_control or target_cost is None or None in control_cost
            or sum(control_cost) >= target_cost):
        return allowed, damage
    look = np.flatnonzero(candidates & objective.evaluated(masks, control=True))
    if len(look):
        damage[look] = objective.control_drops(masks[look])
        allowed[look] = objective.specificity(np.full(len(look), np.inf), damage[look]) > needed
    return allowed, damage


def _beats(objective: Objective, chosen: list[int], current: float, challenger: list[int],
           criterion: float) -> tuple[bool, float | None]:
    """Whether `challenger` (criterion `criterion`) replaces `chosen` (criterion `current`): a higher criterion,
    in CONFIDENCE of the resamples; and that share (None where the criterion alone decided)."""
    if criterion <= current + IMPROVEMENT:
        return False, None
    share = support(objective, chosen, challenger, seed=len(chosen))
    return share >= CONFIDENCE, share
