"""Greedy search over single-head ablations (paper section 4)."""

from __future__ import annotations

import numpy as np

from caploc.methods.base import Method, MethodResult, Objective


class OneShotGreedy(Method):
    """One pass of the N single-head ablations; the k largest drops."""

    name = "1s-greedy"

    def run(self, objective: Objective, k: int) -> MethodResult:
        n = objective.n_heads
        drops = objective.drops(objective.set_masks([[i] for i in range(n)]))
        # stable order: equal drops keep head order, so the ranking is reproducible
        ranking = [int(i) for i in np.argsort(-drops, kind="stable")]
        return MethodResult(ranking=ranking, head_scores=drops, score_name="single-head drop",
                            details={"single_head_drops": drops.tolist()})


class Greedy(Method):
    """Iterative: k rounds; each ablates every remaining head on top of those already chosen and keeps the
    one with the largest drop. Round 1 is exactly one-shot greedy's sweep (shared through the store)."""

    name = "greedy"

    def run(self, objective: Objective, k: int) -> MethodResult:
        n = objective.n_heads
        chosen: list[int] = []
        rounds = []
        first_round = None
        for _ in range(min(k, n)):
            candidates = [i for i in range(n) if i not in chosen]
            drops = objective.drops(objective.set_masks([chosen + [i] for i in candidates]))
            best = int(np.argmax(drops))
            if first_round is None:
                first_round = drops
            chosen.append(candidates[best])
            rounds.append({"head": candidates[best], "cumulative_drop": float(drops[best])})
        rest = [int(i) for i in np.argsort(-first_round, kind="stable") if int(i) not in chosen]
        return MethodResult(ranking=chosen + rest, head_scores=np.asarray(first_round),
                            score_name="single-head drop", details={"rounds": rounds})
