"""What every localization method shares: an objective over ablation sets, the ranked result, and the registry.

The objective answers, for any masks, the drop of the target metric and (control-aware localization) the
drop of one or more control tasks' metrics on the same masks, and combines them into one criterion:

    specificity = target_share - penalty * control_damage
    (with a tolerance: -BARRIER * (1 + control_damage - tolerance) instead, when control_damage > tolerance)

the share of the capability a head set removes, minus `penalty` times the share of the control capabilities
it removes. For a log-probability of the answer the share is of the answer's probability, 1 - exp(-drop) (per
token for per-token metrics); for a score (accuracy, a logit difference) it is 1 - exp(-drop / |baseline|).
control_damage is the mean over the control tasks of max(share removed, 0): improving a control earns nothing
and does not pay for damage to another. The target's share saturates at 1, so breaking a capability ever
further cannot buy damage elsewhere: the control decides between sets that break it. Neither depends on how
confident the model is (a relative drop of a log-probability does: from a baseline of -0.02 nats any head
"removes" thousands of percent). `tolerance` (off by default) makes the
control a constraint as well: a head set that costs the control more than that share ranks below every set
that does not, and among such sets the smaller excess ranks first. Without a control task the criterion is
the plain target drop, the paper's objective. Every per-item score the objective sees is kept, so
`resampled()` can replay a method on bootstrap resamples of the items without a new model call.
docs/results.md has the measurements behind these choices.

Methods register themselves (`@register_method("name")`) and declare their parameters in `__init__`
(`caploc.params`); `make_method(name, **params)` builds one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from caploc.evaluator import Evaluator
from caploc.masks import Masks
from caploc.params import Configurable, Registry
from caploc.stats import LOG_PROBABILITIES, share_removed

DEFAULT_PENALTY = 1.0
DEFAULT_TOLERANCE = None  # off: with the small control sets locate uses, the constraint follows their noise
BARRIER = 1e6  # below any attainable score: past the tolerance, only the control's excess decides
MIN_RATIO = 1e-12  # the mean probability ratio below which a target counts as removed


class NotEvaluated(KeyError):
    """A resampled objective was asked for a mask the original run never evaluated."""


METHODS = Registry("method")


def register_method(name: str, **fixed):
    """Class decorator: register a method under `name`; `fixed` arguments are passed on every build."""
    return METHODS.register(name, **fixed)


def make_method(name: str, **params) -> "Method":
    """The registered method `name` with `params` (None keeps a default)."""
    return METHODS.build(name, **params)


def _point(ablated) -> frozenset:
    """The heads held at 0 where a gradient is taken: its key among the objective's gradients."""
    return frozenset(int(i) for i in ablated)


def _point_at(multipliers) -> bytes:
    """Any multipliers where a gradient is taken: its key among the objective's gradients_at points."""
    return np.asarray(multipliers, dtype=np.float64).tobytes()


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
        self.n_components = evaluator.n_components
        self.per_layer = getattr(evaluator, "per_layer", None)  # None: no layer structure (a stand-in)
        self.requested = 0  # masks this objective asked for on the target (a method's budget, cached or not)
        self.control_requested = 0  # masks it asked for on the controls (every one, unless a method bounds them)
        self.first_look_tokens = 0  # logical tokens of masks scored on the leading items only (`first_look`)
        self._leading: dict[int, tuple[Evaluator, np.ndarray]] = {}  # n -> evaluator of the first n items, baseline
        # what the method saw, by mask key (the evidence bootstrap replays answer from)
        self._seen: dict[str, np.ndarray] = {}  # per-item target scores
        self._seen_control: dict[str, list[np.ndarray]] = {}  # per control, per-item scores
        # per-item gradients, keyed by the set of heads held at 0 (empty: the unablated model)
        self._gradients: dict[frozenset, tuple[np.ndarray, list[np.ndarray]]] = {}
        # per-item gradients and scores at any multipliers, keyed by the point (gradients_at's)
        self._gradients_at: dict[bytes, tuple] = {}
        self.weights: list[np.ndarray | None] = [None] * (1 + len(self.controls))  # bootstrap item weights
        self.baseline_items = evaluator.baseline().scores[metric][0]
        self.control_baseline_items = [c.baseline().scores[m][0] for c, m in zip(self.controls, self.control_metrics)]

    @property
    def has_control(self) -> bool:
        return bool(self.controls)

    # -- per-item scores, kept ---------------------------------------------------------------------------
    def target_items(self, masks: Masks) -> list[np.ndarray]:
        self.requested += len(masks)
        target = self.evaluator.evaluate(masks).scores[self.metric]
        for key, scores in zip(masks.keys(), target):
            self._seen[key] = scores
        return list(target)

    def control_items(self, masks: Masks) -> list[list[np.ndarray]]:
        if not self.controls:
            return [[] for _ in range(len(masks))]
        self.control_requested += len(masks)
        controls = [c.evaluate(masks).scores[m] for c, m in zip(self.controls, self.control_metrics)]
        out = []
        for j, key in enumerate(masks.keys()):
            self._seen_control[key] = [c[j] for c in controls]
            out.append(self._seen_control[key])
        return out

    @property
    def baseline(self) -> float:
        return float(_mean(self.baseline_items, self.weights[0]))

    def control_baselines(self) -> list[float]:
        return [float(_mean(b, w)) for b, w in zip(self.control_baseline_items, self.weights[1:])]

    # -- responses -----------------------------------------------------------------------------------
    def scores(self, masks: Masks) -> np.ndarray:
        """Mean target score under each mask."""
        return np.array([_mean(t, self.weights[0]) for t in self.target_items(masks)])

    def drops(self, masks: Masks) -> np.ndarray:
        """Per mask, the target's drop: the mean drop of the metric; with controls and a log-probability, the
        drop of the items' mean probability ratio (`item_share`), so that its share is averaged per item."""
        if not self.per_item:
            return self.baseline - self.scores(masks)
        return np.array([self.as_drop(self.item_share(t)) for t in self.target_items(masks)])

    @property
    def per_item(self) -> bool:
        """Whether the target's share is taken per item (a log-probability under the control-aware criterion):
        once most items' answers are gone, a set that also removes the rest's ranks higher, where the share of
        the mean drop would already be saturated."""
        return self.has_control and self.metric in LOG_PROBABILITIES

    def item_share(self, scores: np.ndarray) -> float:
        """The mean over items of the share of each answer's probability removed, 1 - p'/p (an item whose
        answer became more likely counts at most -1)."""
        return float(_mean(self._shares(scores, self.baseline_items), self.weights[0]))

    @staticmethod
    def _shares(scores: np.ndarray, baseline: np.ndarray) -> np.ndarray:
        """Per item, the share of the answer's probability removed, 1 - p'/p, within [-1, 1]."""
        return np.clip(-np.expm1(-(baseline - scores)), -1.0, 1.0)

    @staticmethod
    def as_drop(share: float) -> float:
        """The drop whose share (1 - exp(-drop)) is `share`: -log(1 - share), finite."""
        return float(-np.log(max(1.0 - share, MIN_RATIO)))

    def control_drops(self, masks: Masks) -> np.ndarray:
        """Per mask, the control damage: the mean over the control tasks of the share of each one removed
        (`stats.share_removed`), an improvement counting as 0."""
        bases = self.control_baselines()
        return np.array([np.mean([max(float(share_removed(b - _mean(c, w), b, m)), 0.0)
                                  for c, b, w, m in zip(cs, bases, self.weights[1:], self.control_metrics)])
                         for cs in self.control_items(masks)])

    def responses(self, masks: Masks) -> tuple[np.ndarray, np.ndarray | None]:
        """Per mask: the target drop (metric units) and the control damage (`control_drops`; None without
        controls)."""
        target = self.drops(masks)
        return target, (self.control_drops(masks) if self.controls else None)

    def target_share(self, target_drop: np.ndarray) -> np.ndarray:
        """The saturating share of the target capability a drop removes: of a log-probability, the share of
        the answer's probability, 1 - exp(-drop); of a score, 1 - exp(-drop / |baseline|)."""
        target_drop = np.asarray(target_drop, dtype=np.float64)
        if self.metric in LOG_PROBABILITIES:
            return -np.expm1(-target_drop)
        return -np.expm1(-target_drop / (abs(self.baseline) or 1.0))

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

    def criterion(self, masks: Masks) -> np.ndarray:
        return self.specificity(*self.responses(masks))

    def evaluated(self, masks: Masks, control: bool = False) -> np.ndarray:
        """Which masks this objective can answer on the target (or, `control`, on the controls): all of them;
        a resampled one only those the run scored."""
        return np.ones(len(masks), dtype=bool)

    def set_masks(self, head_sets) -> Masks:
        return Masks.from_sets(head_sets, self.n_components)

    @property
    def has_gradients(self) -> bool:
        """Whether the target's metric and every control's have a gradient (AtP can screen)."""
        return self.evaluator.task.has_gradient(self.metric) and all(
            c.task.has_gradient(m) for c, m in zip(self.controls, self.control_metrics))

    # -- a first look on the leading items ----------------------------------------------------------------
    def item_values(self, scores: np.ndarray, baseline: np.ndarray) -> np.ndarray:
        """Per item, what the criterion's target part averages: the share of the answer's probability removed
        (`item_share`'s, where the share is taken per item), else the metric's drop."""
        return self._shares(scores, baseline) if self.per_item else baseline - scores

    def values_needed(self, criterion: float) -> float:
        """The mean item value (`item_values`) at which a mask's criterion could reach `criterion` (its upper
        bound, the control costing nothing)."""
        if self.per_item or not self.controls:
            return criterion
        if criterion >= 1.0:  # a saturating share never reaches it
            return np.inf
        drop = -np.log1p(-criterion)
        return drop if self.metric in LOG_PROBABILITIES else drop * (abs(self.baseline) or 1.0)

    def seen_values(self, heads) -> np.ndarray:
        """Per item, the target value (`item_values`) of a head set this objective already scored."""
        masks = self.set_masks([heads])
        scores = self._seen.get(masks.key(0))
        if scores is None:
            scores = self.target_items(masks)[0]
        return self.item_values(scores, self.baseline_items)

    def first_look(self, masks: Masks, n: int) -> np.ndarray | None:
        """Per mask, the target value (`item_values`) of each of the first `n` items [n_masks, n], from an
        evaluation of those items only: what a method uses to rule out masks before scoring them on every item.
        Not part of the evidence a replay resamples (a resampled objective answers None), nor taken of a score
        without a gradient (None): such a score is a count (accuracy, pass@1), and a few items with no change
        say little about the rest."""
        if not self.evaluator.task.has_gradient(self.metric):
            return None
        if n not in self._leading:
            leading = self.evaluator.subset(n)
            self._leading[n] = (leading, leading.baseline().scores[self.metric][0])
        leading, baseline = self._leading[n]
        self.first_look_tokens += len(masks) * (leading.tokens_per_mask() or 0)
        return self.item_values(leading.evaluate(masks).scores[self.metric], baseline)

    # -- first-order estimates -------------------------------------------------------------------------
    def item_gradients(self, ablated=()) -> tuple[np.ndarray, list[np.ndarray]]:
        """Per item, d metric / d (multiplier of each head) at 1, with the heads in `ablated` held at 0:
        [n_items, n_components] for the target and for each control. Computed once per ablated set."""
        key = _point(ablated)
        if key not in self._gradients:
            at = sorted(key)
            self._gradients[key] = (self.evaluator.gradients(self.metric, at),
                                    [c.gradients(m, at) for c, m in zip(self.controls, self.control_metrics)])
        return self._gradients[key]

    def gradients_at(self, multipliers: np.ndarray) -> tuple[np.ndarray, float, list[tuple[np.ndarray, float]]]:
        """At any component multipliers (1 intact, 0 ablated, between: partly): d target drop / d ablation
        amount (s = 1 - multiplier) [n_components] and the target drop (`drops`' kind), and for every control
        its mean gradient d metric / d multiplier and mean value."""
        grads, values, controls = self.item_gradients_at(multipliers)
        controls = [(_mean(g.T, w), float(_mean(v, w))) for (g, v), w in zip(controls, self.weights[1:])]
        if not self.per_item:
            return _mean(grads.T, self.weights[0]), self.baseline - float(_mean(values, self.weights[0])), controls
        # drop = -log(mean_i r_i), r_i = exp(-(b_i - v_i)) clipped to <= 2: d drop / d s = mean_i r_i g_i / mean r
        ratios = np.exp(-(self.baseline_items - values))
        live = (ratios <= 2.0).astype(np.float64)
        mean_ratio = max(1.0 - self.item_share(values), MIN_RATIO)
        return (_mean((ratios * live)[:, None].T * grads.T, self.weights[0]) / mean_ratio,
                self.as_drop(self.item_share(values)), controls)

    def item_gradients_at(self, multipliers: np.ndarray) -> tuple:
        """Per item at `multipliers`: the target's gradients and scores, and each control's (computed once per
        point)."""
        key = _point_at(multipliers)
        if key not in self._gradients_at:
            self._gradients_at[key] = (
                *self.evaluator.gradients_and_scores(self.metric, multipliers=multipliers),
                [c.gradients_and_scores(m, multipliers=multipliers) for c, m in zip(self.controls,
                                                                                    self.control_metrics)])
        return self._gradients_at[key]

    def estimated_drops(self, ablated=()) -> tuple[np.ndarray, np.ndarray | None]:
        """First-order estimate of each head's ablation drop (multiplier 1 -> 0 changes the metric by about
        minus the gradient), on top of the heads in `ablated`: the target's in metric units, the controls'
        as damage (mean over the controls of each share removed, improvements as 0). Both are changes from the
        `ablated` point, so with a non-empty set they are the marginal drops a further head would add."""
        target, controls = self.item_gradients(ablated)
        estimate = _mean(target.T, self.weights[0])
        if not self.controls:
            return estimate, None
        control = np.mean([np.maximum(share_removed(_mean(g.T, w), b, m), 0.0) for g, w, b, m in
                           zip(controls, self.weights[1:], self.control_baselines(), self.control_metrics)], axis=0)
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

    def target_items(self, masks: Masks) -> list[np.ndarray]:
        return self._stored(masks, self.source._seen)

    def control_items(self, masks: Masks) -> list[list[np.ndarray]]:
        return self._stored(masks, self.source._seen_control) if self.controls else [[] for _ in range(len(masks))]

    @staticmethod
    def _stored(masks: Masks, seen: dict) -> list:
        out = []
        for i, key in enumerate(masks.keys()):
            scores = seen.get(key)
            if scores is None:
                raise NotEvaluated(masks.indices(i))
            out.append(scores)
        return out

    def evaluated(self, masks: Masks, control: bool = False) -> np.ndarray:
        seen = self.source._seen_control if control else self.source._seen
        return np.array([key in seen for key in masks.keys()], dtype=bool)

    def first_look(self, masks: Masks, n: int) -> None:  # a replay has only what the run scored on every item
        return None

    def item_gradients(self, ablated=()):
        key = _point(ablated)
        if key not in self.source._gradients:
            raise NotEvaluated(sorted(key))
        return self.source._gradients[key]

    def item_gradients_at(self, multipliers: np.ndarray) -> tuple:
        key = _point_at(multipliers)
        if key not in self.source._gradients_at:  # a point the run never reached: no model call in a replay
            raise NotEvaluated(np.flatnonzero(np.asarray(multipliers) != 1.0).tolist())
        return self.source._gradients_at[key]


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


class Method(Configurable):
    """A localization method: `run(objective, k)` ranks every component. Its parameters are its
    `__init__`'s (`params()`, `clone()` and the command line's flags come from there); one named `seed` is
    set from the run's seed."""

    name = "method"

    def run(self, objective: Objective, k: int) -> MethodResult:
        raise NotImplementedError

    def for_replay(self, details: dict) -> "Method":
        """The method as bootstrap replays run it, given its run's details (CS keeps the penalty it chose by
        cross-validation instead of choosing again on every resample)."""
        return self
