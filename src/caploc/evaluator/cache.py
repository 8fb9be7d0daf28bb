"""Results of masks already evaluated: this evaluator's memory in front of the persistent store (the role of
lm-eval's CachingLM). A mask is never computed twice, in one run or across runs."""

from __future__ import annotations

import numpy as np

from caploc.evaluator.runner import EvalStats


class ScoreCache:
    def __init__(self, key: dict, metrics: tuple[str, ...], store, stats: EvalStats):
        self.key = key  # what identifies an evaluation besides its mask
        self.metrics = metrics
        self.store = store
        self.stats = stats
        self._memory: dict[bytes, dict] = {}

    @staticmethod
    def _id(mask_row) -> bytes:
        return np.asarray(mask_row, dtype=bool).tobytes()

    def get(self, mask_row) -> dict | None:
        """{"scores": {metric: per-item list}, "texts": [...]} or None when the mask is new."""
        record = self._memory.get(self._id(mask_row))
        if record is None and self.store is not None:
            record = self.store.get(self.key, mask_row)
            if record is not None and not set(self.metrics) <= set(record["scores"]):
                record = None  # stored by a version that computed fewer metrics: recompute
            if record is not None:
                self.stats.reused += 1
                self._memory[self._id(mask_row)] = record
        return record

    def put(self, mask_row, record: dict) -> None:
        self._memory[self._id(mask_row)] = record
        if self.store is not None:
            self.store.put(self.key, mask_row, record)
