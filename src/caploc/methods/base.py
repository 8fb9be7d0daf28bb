"""What every localization method shares: an objective over ablation sets, and the ranked result."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from caploc.evaluator import Evaluator


class Objective:
    """Mean task score under ablation masks, through the one evaluator; drops are relative to baseline."""

    def __init__(self, evaluator: Evaluator, metric: str):
        self.evaluator = evaluator
        self.metric = metric
        self.n_heads = evaluator.n_heads
        self.requested = 0  # masks this objective asked for (a method's budget, cached or not)
        self.baseline_items = evaluator.baseline().scores[metric][0]
        self.baseline = float(self.baseline_items.mean())

    def scores(self, masks: np.ndarray) -> np.ndarray:
        masks = np.asarray(masks, dtype=bool)
        self.requested += len(masks)
        return self.evaluator.evaluate(masks).mean(self.metric)

    def drops(self, masks: np.ndarray) -> np.ndarray:
        return self.baseline - self.scores(masks)

    def set_masks(self, head_sets) -> np.ndarray:
        masks = np.zeros((len(head_sets), self.n_heads), dtype=bool)
        for row, heads in enumerate(head_sets):
            masks[row, list(heads)] = True
        return masks


@dataclass
class MethodResult:
    ranking: list[int]  # flat head indices, most important first
    head_scores: np.ndarray  # one score per head, larger = more important (for heatmaps)
    score_name: str  # what head_scores are ("single-head drop", "-lasso coefficient", ...)
    details: dict = field(default_factory=dict)

    def top(self, k: int) -> list[int]:
        return self.ranking[:k]


class Method:
    name = "method"

    def params(self) -> dict:
        return {}

    def run(self, objective: Objective, k: int) -> MethodResult:
        raise NotImplementedError
