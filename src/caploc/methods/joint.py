"""Joint search: head groups found together, for circuits whose heads back each other up.

A method that adds one head at a time cannot report heads that matter only together: alone, each of a
redundant pair costs nothing (its partner still does the job), so no single-head screen or greedy round ranks
it, and at the intact model its gradient is flat. `joint` proposes heads in groups and decides them exactly:

1. A pool. (a) With `--layers N` (default 0), a layer screen: every layer's heads ablated together (one exact
   mask per layer); the N layers with the best criterion bring all their heads, so a group that sits in one
   layer is in the pool whether or not any of its heads matters alone. The price: among a layer's many
   ablated heads the gradient pruning below can restore one the set needs, so by default the layers are left
   to the layer challenge (step 3), which tests each of them against the set found; `--layer-keep N` prunes
   each screened layer to N heads first, by the gradient with only that layer ablated (a pair inside the layer
   stays: restoring either copy brings the answer back). docs/results.md compares them. (b) Learned gates:
   every head gets an ablation amount s in [0, 1] (its multiplier is 1 - s, on the sites ablation uses), and
   projected gradient ascent on the criterion under a budget sum(s) <= 2k moves the amounts jointly (as some
   heads are turned down, the gradient of their backups grows); the heads with the largest amounts join.
   (c) The largest first-order effects at the intact model (AtP) join.
2. Backward elimination from the whole pool ablated. While the set is larger than `exact_from` (default 2k),
   the gradient at the set (heads in it held at 0) estimates what restoring each one would cost the criterion,
   and the cheapest half of the excess is restored, then the rest of it; from there, every leave-one-out mask
   is evaluated exactly and the head whose restoration costs least is restored, one at a time, down to k.
   Restoring one head of a redundant pair whose partner is still ablated brings the capability back, so both
   are kept. With k = "auto" it goes down to one head and keeps the smallest set that still removes
   `auto_share` of what the set at `exact_from` removes; the curve is in the details.
3. The layer challenge (`methods.groups`; a losing challenger gets one exchange pass and a second try), then
   exchange passes (`methods.exchange`), test the set against its closest competitors (with k "auto", the
   set of 5 heads meets the layers, and a layer that wins is reduced by the auto rule).
"""

from __future__ import annotations

from typing import Annotated

import numpy as np

from caploc.methods.base import Method, MethodResult, Objective, register_method
from caploc.methods.exchange import DEFAULT_EXCHANGE, DEFAULT_SWAPS, PASSES, SWAPS, exchange
from caploc.methods.greedy import bounded_effects
from caploc.methods.groups import LAYERS, challenge_layers, criterion_gradient, eliminate, layer_groups, prune
from caploc.params import Param

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


@register_method("joint")
class JointSearch(Method):
    """Joint search: a layer screen and learned gates propose head groups, backward elimination from the whole
    group ablated decides them exactly (it keeps heads that matter only together), then exchange passes."""

    name = "joint"
    supports_auto_k = True

    def __init__(self, layers: Annotated[int, Param("joint: layers whose heads join the pool (by their whole "
                                                    "ablation's criterion; 0: the layer challenge alone "
                                                    "tests layers)")] = 0,
                 layer_keep: Annotated[int, Param("joint: heads each screened layer keeps, pruned by the gradient "
                                                  "at that layer ablated (0: all of them)")] = 0,
                 steps: Annotated[int, Param("joint: gradient steps of the learned gates (0: none)")] = 4,
                 exact_from: Annotated[int | None, Param("joint: set size below which elimination is exact "
                                                         "(default 2 x k)")] = None,
                 auto_share: Annotated[float, Param("joint, with --k auto: the share of the group's removal the "
                                                    "smallest set must keep")] = 0.9,
                 exchange_passes: PASSES = DEFAULT_EXCHANGE, exchange_swaps: SWAPS = DEFAULT_SWAPS,
                 layer_challenge: LAYERS = True):
        self.layers = layers
        self.layer_keep = layer_keep
        self.steps = steps
        self.exact_from = exact_from
        self.auto_share = auto_share
        self.exchange_passes = exchange_passes
        self.exchange_swaps = exchange_swaps
        self.layer_challenge = layer_challenge

    # -- 1. the pool ---------------------------------------------------------------------------------------
    def layer_screen(self, objective: Objective) -> tuple[list[int], list[float], list[dict]]:
        """Each layer's heads ablated together; the heads of the best `layers` layers (each pruned to
        `layer_keep` at that layer ablated, where set), every layer's criterion (NaN where its controls could
        not change which layers are best, so were not evaluated) and the pruning records."""
        groups = layer_groups(objective)
        criterion, target, _ = bounded_effects(objective, objective.set_masks(groups), keep=self.layers)
        best = np.lexsort((-target, -np.nan_to_num(criterion, nan=-np.inf)))[: self.layers]
        heads, records = [], []
        for layer in best:
            kept, pruning = (prune(objective, groups[int(layer)], self.layer_keep) if self.layer_keep
                             else (groups[int(layer)], []))
            heads += kept
            records += [r | {"layer": int(layer)} for r in pruning]
        return heads, [float(c) for c in criterion], records

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
    def choose_auto(self, curve: list[dict]) -> dict:
        """The smallest set on the elimination path that keeps `auto_share` of the first set's target drop."""
        keep = self.auto_share * curve[0]["target_drop"]
        return min((c for c in curve if c["target_drop"] >= keep), key=lambda c: c["size"])

    def decide(self, objective: Objective, group: list[int], k) -> tuple[list[int], list[dict]]:
        auto = k == AUTO or k is None
        chosen, curve = eliminate(objective, group, None if auto else int(k))
        return (self.choose_auto(curve)["heads"] if auto else chosen), curve

    # -- 3. the layer challenge ------------------------------------------------------------------------
    def challenge(self, objective: Objective, chosen: list[int], set_drop: float, set_damage: float | None,
                  curve: list[dict], k) -> tuple[list[int], float, float | None, dict | None]:
        """Every layer against the set (`groups.challenge_layers`, a losing challenger polished by one exchange
        pass). With k "auto" the set challenged is the curve's of AUTO_START heads (a redundant group the pool
        missed leaves the auto set a head or two, too small to challenge), and a winning layer's heads are
        reduced by the same auto rule, their curve in the record."""
        polish = self.exchange_swaps if self.exchange_passes else 0
        if k not in (AUTO, None):
            return challenge_layers(objective, chosen, set_drop, set_damage, polish)
        start = next((c for c in curve if c["size"] <= AUTO_START), curve[-1])  # a replay's curve can stop early
        _, _, _, record = challenge_layers(objective, start["heads"], start["target_drop"],
                                           start.get("control_damage"), polish)
        if not record or record["set"] is None:
            return chosen, set_drop, set_damage, record
        chosen, record["elimination"] = self.decide(objective, record["set"], k)
        last = next(c for c in record["elimination"] if c["size"] == len(chosen))
        return chosen, last["target_drop"], last.get("control_damage"), record

    def decide_and_test(self, objective: Objective, group: list[int], k) -> tuple[list[int], list[dict],
                                                                                  dict | None, list[dict]]:
        """Steps 2 and 3 from the exact stage's `group`: the set, the elimination curve, the layer challenge's
        record and the exchange passes'."""
        chosen, curve = self.decide(objective, group, k)
        exchanges, challenge = [], None
        if chosen:
            last = next(c for c in curve if c["size"] == len(chosen))
            set_drop, set_damage = last["target_drop"], last.get("control_damage")
            if self.layer_challenge:
                chosen, set_drop, set_damage, challenge = self.challenge(objective, chosen, set_drop, set_damage,
                                                                         curve, k)
            if self.exchange_passes:
                chosen, exchanges = exchange(objective, chosen, set_drop, set_damage, self.exchange_passes,
                                             self.exchange_swaps, objective.estimated_drops)
        return chosen, curve, challenge, exchanges

    # -- the method -------------------------------------------------------------------------------------
    def run(self, objective: Objective, k) -> MethodResult:
        size = AUTO_START if k in (AUTO, None) else int(k)
        per_layer = objective.per_layer
        first, first_control = objective.estimated_drops()
        by_effect = [int(i) for i in np.argsort(-objective.specificity(first, first_control), kind="stable")]
        layer_heads, layer_criterion, layer_pruning = (self.layer_screen(objective) if per_layer and self.layers
                                                       else ([], [], []))
        gates, gate_values = self.gates(objective, 2.0 * size) if self.steps else (np.zeros(len(first)), [])
        by_gate = [int(i) for i in np.argsort(-gates, kind="stable")] if self.steps else []
        pool = list(dict.fromkeys(layer_heads + by_gate[: 2 * size] + by_effect[:size]))
        exact_from = self.exact_from or 2 * size
        group, pruning = prune(objective, pool, exact_from)
        chosen, curve, challenge, exchanges = self.decide_and_test(objective, group, k)
        order = chosen + [i for i in group + pool + by_gate + by_effect if i not in chosen]
        order = list(dict.fromkeys(order + list(range(objective.n_components))))
        details = {"layer_criterion": layer_criterion, "layer_pruning": layer_pruning, "gates": gates.tolist(),
                   "gate_criterion": gate_values, "pool": pool, "pruning": pruning, "group": group,
                   "elimination": curve, "layer_challenge": challenge, "exchanges": exchanges,
                   "k": len(chosen), "auto": k in (AUTO, None),
                   # forward + backward passes: the intact model's, one per gate step and pruning step (the
                   # screened layers' and the pool's), one per exchange pass
                   "gradient_points": 1 + len(gate_values) + len(layer_pruning) + len(pruning) + len(exchanges)
                   + (challenge or {}).get("gradient_points", 0)}
        if details["auto"]:
            details["auto_share"] = self.auto_share
        return MethodResult(ranking=order, head_scores=gates, score_name="learned gate (share ablated)",
                            details=details, target_effects=first, control_effects=first_control)

    def for_replay(self, details: dict) -> "JointSearch":
        """Replays start from the run's exact stage (the set its pool was pruned to: the gates and the gradient
        pruning came from points a resample never reached) and redo the exact elimination, the layer challenge
        and the exchange passes on what the run evaluated (where a resample leads elsewhere, the options the
        run evaluated decide)."""
        return _Replay(self, details["group"])


class _Replay(JointSearch):
    def __init__(self, source: JointSearch, group: list[int]):
        super().__init__(**source.params())
        self._group = group

    def run(self, objective: Objective, k) -> MethodResult:
        chosen, curve, challenge, exchanges = self.decide_and_test(objective, self._group, k)
        order = list(dict.fromkeys(chosen + self._group + list(range(objective.n_components))))
        return MethodResult(ranking=order, head_scores=np.full(objective.n_components, np.nan),
                            score_name="learned gate (share ablated)",
                            details={"elimination": curve, "layer_challenge": challenge, "exchanges": exchanges})
