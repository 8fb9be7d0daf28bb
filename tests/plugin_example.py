"""A method and a task of one's own, defined outside caploc: registering them is all it takes for the command
line (`CAPLOC_PLUGINS=plugin_example`) and `locate` to know them."""

from __future__ import annotations

import random
from typing import Annotated

import numpy as np

from caploc.methods import Method, MethodResult, register_method
from caploc.params import Param
from caploc.tasks import Item, TargetTask, register_task


@register_method("late-sweep")
class LateLayerSweep(Method):
    """Single-head ablations in the last layers only, ranked by drop (earlier heads after, in index order)."""

    name = "late-sweep"

    def __init__(self, last_layers: Annotated[int, Param("late-sweep: how many of the last layers to sweep")] = 2):
        self.last_layers = last_layers

    def run(self, objective, k):
        per_layer = objective.evaluator.lm.layout.n_heads
        first = objective.n_components - self.last_layers * per_layer
        swept = list(range(max(0, first), objective.n_components))
        drops = objective.drops(objective.set_masks([[i] for i in swept]))
        scores = np.full(objective.n_components, -np.inf)
        scores[swept] = drops
        ranking = [int(i) for i in np.argsort(-scores, kind="stable")]
        return MethodResult(ranking=ranking, head_scores=scores, score_name="late single-head drop")


@register_task()
class Echo(TargetTask):
    """Echo: a word, then the same word again (a copying task of a few tokens)."""

    name = "echo"

    def __init__(self, words: Annotated[int, Param("how many words a prompt repeats before the target")] = 2):
        super().__init__()
        self.words = words

    def config(self) -> dict:
        return super().config() | {"words": self.words}

    def pool(self, seed: int, needed: int) -> list[Item]:
        rng = random.Random(f"echo:{seed}")
        items = []
        for i in range(needed):
            word = "".join(rng.choice("abcdefgh") for _ in range(3))
            items.append(Item(id=f"echo/{seed}/{i}", context=" ".join([word] * self.words), target=" " + word))
        return items
