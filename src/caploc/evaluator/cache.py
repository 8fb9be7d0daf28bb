"""Results of masks already evaluated: this evaluator's memory in front of the persistent store (the role of
lm-eval's CachingLM). A mask is never computed twice, in one run or across runs; both are keyed by
`masks.mask_key`."""

from __future__ import annotations

from typing import Callable

from caploc.evaluator.runner import EvalStats


class ScoreCache:
    def __init__(self, key: dict, metrics: tuple[str, ...], store, stats: EvalStats,
                 score_texts: Callable[[list[str]], dict[str, list[float]]] | None = None):
        self.key = key  # what identifies an evaluation besides its mask
        self.metrics = metrics
        self.store = store
        self.stats = stats
        self.score_texts = score_texts  # generation tasks: one mask's texts -> {metric: per-item scores}
        self._memory: dict[str, dict] = {}

    def get(self, mask: str) -> dict | None:
        """{"scores": {metric: per-item list}, "texts": [...]} for the mask key `mask`, or None when new."""
        record = self._memory.get(mask)
        if record is None and self.store is not None:
            record = self.store.get(self.key, mask)
            if record is not None and not set(self.metrics) <= set(record["scores"]):
                # stored by a version that computed fewer metrics: scored again from the stored generations
                # (gsm8k's acc_strict; no model call), else recomputed
                texts = record.get("texts")
                record = ({**record, "scores": self.score_texts(texts)} if texts and self.score_texts
                          else None)
            if record is not None:
                self.stats.reused += 1
                self._memory[mask] = record
        return record

    def put(self, mask: str, n_ablated: int, record: dict) -> None:
        self._memory[mask] = record
        if self.store is not None:
            self.store.put(self.key, mask, n_ablated, record)
