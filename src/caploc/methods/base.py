"""What every localization method shares: an objective over ablation sets, and the ranked result.

The objective answers, for any masks, the drop of the target metric and (control-aware localization) the
relative drop of one or more control tasks' metrics on the same masks, and combines them into one criterion:

    specificity = (1 - exp(-target_drop / |target_baseline|)) - penalty * max(control_drop, 0)
    (with a tolerance: -BARRIER * (1 + control_drop - tolerance) instead, when control_drop > tolerance)

where control_drop is the mean over control tasks of max(drop / |baseline|, 0): the share of the capability a
head set removes, minus `penalty` times the share of the control capabilities it removes (improving a control
earns nothing, and does not pay for damage to another: with `general,text` a set of early heads improved
`general` by 4% and cost `text` 5%, and a signed mean called that 0.3%). The target's share saturates: it
equals the relative drop for small drops and never exceeds 1, because a log-probability's relative drop is
unbounded, and linearly it let breaking a capability ever further buy any damage elsewhere: on induction
(baseline -1.95 nats) three layer-1 heads take the answer to -13 nats (relative drop 5.6) while costing 81%
of `general`'s answer log-probability and 32 accuracy points, and outscored the five top prefix-matching
heads, which take induction accuracy from 0.62 to 0 for 1.7 points of `general` (relative drop 2.3).
Saturated, breaking a capability is worth at most 1 and the control decides between sets that break it.
`tolerance` (off by default) makes the control a constraint as well: a head set that costs the control more
than that share is ranked below every set that does not, however much target it removes, and among such
sets the smaller excess ranks first; measured on 8 control items it followed their noise, so it is opt-in,
for large control sets. Without a control task the criterion is the plain target drop, the paper's
objective. Every per-item score the objective sees is kept, so `resampled()` can replay a method on
bootstrap resamples of the items without a new model call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from caploc.evaluator import Evaluator

DEFAULT_PENALTY = 1.0
DEFAULT_TOLERANCE = None  # off: with the small control sets locate uses, the constraint follows their noise
BARRIER = 1e6  # below any attainable score: past the tolerance, only the control's excess decides


class NotEvaluated(KeyError):
    """A resampled objective was asked for a mask the original run never evaluated."""


def _point(ablated) -> frozenset:
    """The heads held at 0 where a gradient is taken: its key among the objective's gradients."""
    return frozenset(int(i) for i in ablated)


def _mean(values: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """Mean over the last axis (items), bootstrap-weighted when `weights` is given."""
    return values.mean(axis=-1) if weights is None else values @ weights / weights.sum()


class Objective:
    def __init__(self, evaluator: Evaluator, metric: str, controls: list[Evaluator] | None = None,
                 penalty: float = DEFAULT_PENALTY, tolerance: float | None = DEFAULT_TOLERANCE):
        self.evaluator = evaluator
        self.metric = metric
        self.controls = list(controls or [])
        self.control_metrics = [c.task.identification_metric for c in self.controls]
        self.penalty = float(penalty)
        self.tolerance = None if tolerance is None else float(tolerance)
        self.n_heads = evaluator.n_heads
        self.requested = 0  # masks this objective asked for on the target (a method's budget, cached or not)
        self.control_requested = 0  # masks it asked for on the controls (every one, unless a method bounds them)
        self._seen: dict[bytes, np.ndarray] = {}  # mask -> per-item target scores
        self._seen_control: dict[bytes, list[np.ndarray]] = {}  # mask -> per control, per-item scores
        # per-item gradients, keyed by the set of heads held at 0 (empty: the unablated model)
        self._gradients: dict[frozenset, tuple[np.ndarray, list[np.ndarray]]] = {}
        self.weights: list[np.ndarray | None] = [None] * (1 + len(self.controls))  # bootstrap item weights
        self.baseline_items = evaluator.baseline().scores[metric][0]
        self.control_baseline_items = [c.baseline().scores[m][0] for c, m in zip(self.controls, self.control_metrics)]

    @property
    def has_control(self) -> bool:
        return bool(self.controls)

    # -- per-item scores, kept ---------------------------------------------------------------------------
    def target_items(self, masks: np.ndarray) -> list[np.ndarray]:
        masks = np.asarray(masks, dtype=bool)
        self.requested += len(masks)
        target = self.evaluator.evaluate(masks).scores[self.metric]
        for row, scores in zip(masks, target):
            self._seen[row.tobytes()] = scores
        return list(target)

    def control_items(self, masks: np.ndarray) -> list[list[np.ndarray]]:
        masks = np.asarray(masks, dtype=bool)
        if not self.controls:
            return [[] for _ in masks]
        self.control_requested += len(masks)
        controls = [c.evaluate(masks).scores[m] for c, m in zip(self.controls, self.control_metrics)]
        out = []
        for j, row in enumerate(masks):
            self._seen_control[row.tobytes()] = [c[j] for c in controls]
            out.append(self._seen_control[row.tobytes()])
        return out

    @property
    def baseline(self) -> float:
        return float(_mean(self.baseline_items, self.weights[0]))

    def control_baselines(self) -> list[float]:
        return [float(_mean(b, w)) for b, w in zip(self.control_baseline_items, self.weights[1:])]

    # -- responses -----------------------------------------------------------------------------------
    def scores(self, masks: np.ndarray) -> np.ndarray:
        """Mean target score under each mask."""
        return np.array([_mean(t, self.weights[0]) for t in self.target_items(masks)])

    def drops(self, masks: np.ndarray) -> np.ndarray:
        return self.baseline - self.scores(masks)

    def control_drops(self, masks: np.ndarray) -> np.ndarray:
        """Per mask, the control damage: the mean over the control tasks of each one's relative drop, an
        improvement counting as 0."""
        bases = self.control_baselines()
        return np.array([np.mean([max((b - _mean(c, w)) / (abs(b) or 1.0), 0.0)
                                  for c, b, w in zip(cs, bases, self.weights[1:])])
                         for cs in self.control_items(masks)])

    def responses(self, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Per mask: the target drop (metric units) and the control damage (`control_drops`; None without
        controls)."""
        target = self.drops(masks)
        return target, (self.control_drops(masks) if self.controls else None)

    def target_share(self, target_drop: np.ndarray) -> np.ndarray:
        """The saturating share of the target capability a drop removes: 1 - exp(-drop / |baseline|)."""
        return -np.expm1(-np.asarray(target_drop, dtype=np.float64) / (abs(self.baseline) or 1.0))

    def upper_bound(self, target_drop: np.ndarray) -> np.ndarray:
        """What the criterion can be at most, given the target drop alone: the control only ever subtracts."""
        target_drop = np.asarray(target_drop, dtype=np.float64)
        return self.target_share(target_drop) if self.controls else target_drop

    def specificity(self, target_drop: np.ndarray, control_drop: np.ndarray | None) -> np.ndarray:
        """The criterion methods maximize (module docstring); the plain target drop without controls."""
        target_drop = np.asarray(target_drop, dtype=np.float64)
        if control_drop is None:
            return target_drop
        control_drop = np.asarray(control_drop, dtype=np.float64)
        score = self.target_share(target_drop) - self.penalty * np.maximum(control_drop, 0)
        if self.tolerance is None:
            return score
        excess = control_drop - self.tolerance
        return np.where(excess > 0, -BARRIER * (1 + np.maximum(excess, 0)), score)

    def criterion(self, masks: np.ndarray) -> np.ndarray:
        return self.specificity(*self.responses(masks))

    def evaluated(self, masks: np.ndarray, control: bool = False) -> np.ndarray:
        """Which masks this objective can answer on the target (or, `control`, on the controls): all of them;
        a resampled one only those the run scored."""
        return np.ones(len(masks), dtype=bool)

    def set_masks(self, head_sets) -> np.ndarray:
        masks = np.zeros((len(head_sets), self.n_heads), dtype=bool)
        for row, heads in enumerate(head_sets):
            masks[row, list(heads)] = True
        return masks

    # -- first-order estimates -------------------------------------------------------------------------
    def item_gradients(self, ablated=()) -> tuple[np.ndarray, list[np.ndarray]]:
        """Per item, d metric / d (multiplier of each head) at 1, with the heads in `ablated` held at 0:
        [n_items, n_heads] for the target and for each control. Computed once per ablated set."""
        key = _point(ablated)
        if key not in self._gradients:
            at = sorted(key)
            self._gradients[key] = (self.evaluator.gradients(self.metric, at),
                                    [c.gradients(m, at) for c, m in zip(self.controls, self.control_metrics)])
        return self._gradients[key]

    def estimated_drops(self, ablated=()) -> tuple[np.ndarray, np.ndarray | None]:
        """First-order estimate of each head's ablation drop (multiplier 1 -> 0 changes the metric by about
        minus the gradient), on top of the heads in `ablated`: the target's in metric units, the controls'
        as damage (mean over the controls of each relative drop, improvements as 0). Both are changes from the
        `ablated` point, so with a non-empty set they are the marginal drops a further head would add."""
        target, controls = self.item_gradients(ablated)
        estimate = _mean(target.T, self.weights[0])
        if not self.controls:
            return estimate, None
        control = np.mean([np.maximum(_mean(g.T, w) / (abs(b) or 1.0), 0.0)
                           for g, w, b in zip(controls, self.weights[1:], self.control_baselines())], axis=0)
        return estimate, control

    # -- bootstrap ---------------------------------------------------------------------------------------
    def resampled(self, rng: np.random.Generator) -> "ResampledObjective":
        return ResampledObjective(self, rng)


class ResampledObjective(Objective):
    """The same objective on a bootstrap resample of its items (target and each control's items resampled
    independently), answered from the scores the original run stored; a mask it never evaluated raises
    NotEvaluated."""

    def __init__(self, source: Objective, rng: np.random.Generator):  # no super().__init__: it would evaluate
        self.__dict__.update(source.__dict__)
        self.source = source
        self.requested = self.control_requested = 0
        self.weights = [np.bincount(rng.integers(0, len(b), len(b)), minlength=len(b)).astype(np.float64)
                        for b in [source.baseline_items, *source.control_baseline_items]]

    def target_items(self, masks: np.ndarray) -> list[np.ndarray]:
        return self._stored(masks, self.source._seen)

    def control_items(self, masks: np.ndarray) -> list[list[np.ndarray]]:
        return self._stored(masks, self.source._seen_control) if self.controls else [[] for _ in masks]

    @staticmethod
    def _stored(masks: np.ndarray, seen: dict) -> list:
        out = []
        for row in np.asarray(masks, dtype=bool):
            scores = seen.get(row.tobytes())
            if scores is None:
                raise NotEvaluated(np.flatnonzero(row).tolist())
            out.append(scores)
        return out

    def evaluated(self, masks: np.ndarray, control: bool = False) -> np.ndarray:
        seen = self.source._seen_control if control else self.source._seen
        return np.array([row.tobytes() in seen for row in np.asarray(masks, dtype=bool)], dtype=bool)

    def item_gradients(self, ablated=()):
        key = _point(ablated)
        if key not in self.source._gradients:
            raise NotEvaluated(sorted(key))
        return self.source._gradients[key]


@dataclass
class MethodResult:
    ranking: list[int]  # flat head indices, most important first
    head_scores: np.ndarray  # one score per head, larger = more important (for heatmaps)
    score_name: str  # what head_scores are ("single-head drop", "-lasso coefficient", ...)
    details: dict = field(default_factory=dict)
    # per head: the method's estimate of its own ablation's drop on the target and the control metric
    target_effects: np.ndarray | None = None
    control_effects: np.ndarray | None = None

    def top(self, k: int) -> list[int]:
        return self.ranking[:k]


class Method:
    name = "method"

    def params(self) -> dict:
        return {}

    def run(self, objective: Objective, k: int) -> MethodResult:
        raise NotImplementedError

    def for_replay(self, details: dict) -> "Method":
        """The method as bootstrap replays run it, given its run's details (CS keeps the penalty it chose by
        cross-validation instead of choosing again on every resample)."""
        return self
