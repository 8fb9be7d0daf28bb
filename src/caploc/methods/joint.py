"""Joint search: head groups found together, for circuits whose heads back each other up.

A method that adds one head at a time cannot report heads that matter only together: alone, each of a
redundant pair costs nothing (its partner still does the job), so no single-head screen or greedy round ranks
it, and at the intact model its gradient is flat. `joint` proposes heads in groups and decides them exactly:

1. A pool. (a) Layer screen: every layer's heads ablated together (one exact mask per layer); the `layers`
   layers with the best criterion bring all their heads, so a group that sits in one layer is in the pool
   whether or not any of its heads matters alone. (b) Learned gates: every head gets an ablation amount s in
   [0, 1] (its multiplier is 1 - s, on the sites ablation uses), and projected gradient ascent on the
   criterion under a budget sum(s) <= 2k moves the amounts jointly (as some heads are turned down, the
   gradient of their backups grows); the heads with the largest amounts join. (c) The largest first-order
   effects at the intact model (AtP) join.
2. Backward elimination from the whole pool ablated. While the set is larger than `exact_from` (default 2k),
   the gradient at the set (heads in it held at 0) estimates what restoring each one would cost the criterion,
   and the cheapest half of the excess is restored, then the rest of it; from there, every leave-one-out mask is evaluated exactly
   and the head whose restoration costs least is restored, one at a time, down to k. Restoring one head of a
   redundant pair whose partner is still ablated brings the capability back, so both are kept. With k =
   "auto" it goes down to one head and keeps the smallest set that still removes `auto_share` of what the set
   at `exact_from` removes; the curve is in the details.
3. Exchange passes (`methods.exchange`) test the set against its closest single swaps.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np

from caploc.methods.base import Method, MethodResult, Objective, register_method
from caploc.methods.exchange import DEFAULT_EXCHANGE, DEFAULT_SWAPS, PASSES, SWAPS, exchange
from caploc.methods.greedy import bounded_effects
from caploc.params import Param
from caploc.stats import LOG_PROBABILITIES, share_removed

AUTO = "auto"
AUTO_START = 5  # with k "auto": the size the budget, the pool and the exact stage are scaled for


def project_capped_simplex(s: np.ndarray, budget: float) -> np.ndarray:
    """The point of {x in [0, 1]^n, sum x <= budget} nearest to s."""
    clipped = np.clip(s, 0.0, 1.0)
    if clipped.sum() <= budget:
        return clipped
    low, high = 0.0, float(s.max())
    for _ in range(60):  # bisection on the common shift
        tau = (low + high) / 2
        if np.clip(s - tau, 0.0, 1.0).sum() > budget:
            low = tau
        else:
            high = tau
    return np.clip(s - high, 0.0, 1.0)


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


@register_method("joint")
class JointSearch(Method):
    """Joint search: a layer screen and learned gates propose head groups, backward elimination from the whole
    group ablated decides them exactly (it keeps heads that matter only together), then exchange passes."""

    name = "joint"
    supports_auto_k = True

    def __init__(self, layers: Annotated[int, Param("joint: layers whose heads all join the pool (by their "
                                                    "ablation's criterion)")] = 2,
                 steps: Annotated[int, Param("joint: gradient steps of the learned gates (0: none)")] = 4,
                 exact_from: Annotated[int | None, Param("joint: set size below which elimination is exact "
                                                         "(default 2 x k)")] = None,
                 auto_share: Annotated[float, Param("joint, with --k auto: the share of the group's removal the "
                                                    "smallest set must keep")] = 0.9,
                 exchange_passes: PASSES = DEFAULT_EXCHANGE, exchange_swaps: SWAPS = DEFAULT_SWAPS):
        self.layers = layers
        self.steps = steps
        self.exact_from = exact_from
        self.auto_share = auto_share
        self.exchange_passes = exchange_passes
        self.exchange_swaps = exchange_swaps

    # -- 1. the pool ---------------------------------------------------------------------------------------
    def layer_screen(self, objective: Objective, per_layer: int) -> tuple[list[int], list[float]]:
        """Each layer's heads ablated together; the heads of the best `layers` layers, and every layer's
        criterion (NaN where its controls could not change which layers are best, so were not evaluated)."""
        n_layers = objective.n_components // per_layer
        groups = [list(range(layer * per_layer, (layer + 1) * per_layer)) for layer in range(n_layers)]
        criterion, target, _ = bounded_effects(objective, objective.set_masks(groups), keep=self.layers)
        best = np.lexsort((-target, -np.nan_to_num(criterion, nan=-np.inf)))[: self.layers]
        return [h for layer in best for h in groups[int(layer)]], [float(c) for c in criterion]

    def gates(self, objective: Objective, budget: float) -> tuple[np.ndarray, list[float]]:
        """Projected gradient ascent on the criterion over ablation amounts (start: the budget spread evenly)."""
        s = np.full(objective.n_components, min(1.0, budget / objective.n_components))
        values, step_size = [], 0.5
        for _ in range(self.steps):
            gradient, value = criterion_gradient(objective, 1.0 - s)
            values.append(value)
            scale = np.abs(gradient).max()
            if scale > 0:
                s = project_capped_simplex(s + step_size * gradient / scale, budget)
            step_size *= 0.85
        return s, values

    # -- 2. backward elimination ------------------------------------------------------------------------
    def prune(self, objective: Objective, group: list[int], target_size: int) -> tuple[list[int], list[dict]]:
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

    def eliminate(self, objective: Objective, group: list[int], k: int | None) -> tuple[list[int], list[dict]]:
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
            options = [out for out, ok in zip(current, known) if ok]
            best = int(np.argmax(np.where(np.isnan(scores), -np.inf, scores)))
            current = [h for h in current if h != options[best]]
            curve.append({"size": len(current), "heads": list(current), "restored": options[best],
                          "criterion": float(scores[best]), "target_drop": float(target[best])}
                         | ({"control_damage": float(control[best])} if control is not None else {}))
        return current, curve

    def choose_auto(self, curve: list[dict]) -> dict:
        """The smallest set on the elimination path that keeps `auto_share` of the first set's target drop."""
        keep = self.auto_share * curve[0]["target_drop"]
        return min((c for c in curve if c["target_drop"] >= keep), key=lambda c: c["size"])

    def decide(self, objective: Objective, group: list[int], k) -> tuple[list[int], list[dict]]:
        auto = k == AUTO or k is None
        chosen, curve = self.eliminate(objective, group, None if auto else int(k))
        return (self.choose_auto(curve)["heads"] if auto else chosen), curve

    # -- the method -------------------------------------------------------------------------------------
    def run(self, objective: Objective, k) -> MethodResult:
        size = AUTO_START if k in (AUTO, None) else int(k)
        per_layer = objective.per_layer
        first, first_control = objective.estimated_drops()
        by_effect = [int(i) for i in np.argsort(-objective.specificity(first, first_control), kind="stable")]
        layer_heads, layer_criterion = (self.layer_screen(objective, per_layer) if per_layer and self.layers
                                        else ([], []))
        gates, gate_values = self.gates(objective, 2.0 * size) if self.steps else (np.zeros(len(first)), [])
        by_gate = [int(i) for i in np.argsort(-gates, kind="stable")] if self.steps else []
        pool = list(dict.fromkeys(layer_heads + by_gate[: 2 * size] + by_effect[:size]))
        exact_from = self.exact_from or 2 * size
        group, pruning = self.prune(objective, pool, exact_from)
        chosen, curve = self.decide(objective, group, k)
        exchanges = []
        if self.exchange_passes and chosen:
            last = next(c for c in curve if c["size"] == len(chosen))
            chosen, exchanges = exchange(objective, chosen, last["target_drop"], last.get("control_damage"),
                                         self.exchange_passes, self.exchange_swaps, objective.estimated_drops)
        order = chosen + [i for i in group + pool + by_gate + by_effect if i not in chosen]
        order = list(dict.fromkeys(order + list(range(objective.n_components))))
        details = {"layer_criterion": layer_criterion, "gates": gates.tolist(), "gate_criterion": gate_values,
                   "pool": pool, "pruning": pruning, "group": group, "elimination": curve, "exchanges": exchanges,
                   "k": len(chosen), "auto": k in (AUTO, None),
                   # forward + backward passes: the intact model's, one per gate step and pruning step, one per
                   # exchange pass
                   "gradient_points": 1 + len(gate_values) + len(pruning) + len(exchanges)}
        if details["auto"]:
            details["auto_share"] = self.auto_share
        return MethodResult(ranking=order, head_scores=gates, score_name="learned gate (share ablated)",
                            details=details, target_effects=first, control_effects=first_control)

    def for_replay(self, details: dict) -> "JointSearch":
        """Replays start from the run's exact stage (the set its pool was pruned to: the gates and the gradient
        pruning came from points a resample never reached) and redo the exact elimination."""
        return _Replay(self, details["group"])


class _Replay(JointSearch):
    def __init__(self, source: JointSearch, group: list[int]):
        super().__init__(**source.params())
        self._group = group

    def run(self, objective: Objective, k) -> MethodResult:
        chosen, curve = self.decide(objective, self._group, k)
        order = list(dict.fromkeys(chosen + self._group + list(range(objective.n_components))))
        return MethodResult(ranking=order, head_scores=np.full(objective.n_components, np.nan),
                            score_name="learned gate (share ablated)", details={"elimination": curve})
