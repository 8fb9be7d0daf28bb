"""Tasks turn dataset items into prompts and score the model's behaviour on them.

Three scoring kinds, all evaluated by the one `Evaluator`:
- "target": the correct continuation is known (Arithmetic). One teacher-forced pass gives
  `acc` (greedy decoding would produce exactly the target: argmax matches at every target position)
  and `logprob` (log-probability of the target, a continuous score).
- "choice": multiple choice by log-likelihood: `acc`, `acc_norm` (per-character normalized),
  `logprob` of the correct choice, and `logprob_all`, the mean log-likelihood of all choices.
- "generate": greedy generation up to a stop string, scored by the task (`score`).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from typing import ClassVar

from caploc.errors import CaplocError

KINDS = ("target", "choice", "generate")


@dataclass(frozen=True)
class Item:
    id: str
    context: str  # the item-specific part of the prompt
    prefix: str = ""  # few-shot text shared by many items: computed once per mask and reused
    target: str | None = None  # "target" kind
    choices: tuple[str, ...] = ()  # "choice" kind
    label: int | None = None  # "choice" kind: index of the correct choice
    answer: str | None = None  # "generate" kind: reference answer for the scorer
    meta: dict = field(default_factory=dict, compare=False, hash=False)


class Task:
    """Base class. Subclasses set `name`, `kind`, and implement `pool()` (the ordered candidate items)."""

    name: ClassVar[str] = "task"
    kind: ClassVar[str] = "target"
    metrics: ClassVar[tuple[str, ...]] = ("acc", "logprob")
    default_metric: ClassVar[str] = "acc"
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()

    def __init__(self, shots: int = 0, chat: bool = False):
        if shots < 0:
            raise CaplocError("--shots must be >= 0")
        self.shots = shots
        self.chat = chat

    # -- items -------------------------------------------------------------------------------------
    def pool(self, seed: int, needed: int) -> list[Item]:
        """At least `needed` items (or all there are) in a seeded, deterministic order."""
        raise NotImplementedError

    def items(self, n: int, seed: int = 0, offset: int = 0) -> list[Item]:
        """Items [offset, offset+n) of the seeded order: disjoint offsets give disjoint item sets."""
        if n <= 0:
            raise CaplocError("--n must be positive")
        pool = self.pool(seed, offset + n)
        chosen = pool[offset: offset + n]
        if not chosen:
            raise CaplocError(f"task {self.name} has only {len(pool)} items; nothing left at offset {offset}")
        return chosen

    @staticmethod
    def shuffled(records: list, seed: int, salt: str) -> list:
        order = list(range(len(records)))
        random.Random(f"{salt}:{seed}").shuffle(order)
        return [records[i] for i in order]

    # -- scoring (generate kind) -------------------------------------------------------------------
    def score(self, item: Item, generated: str) -> float:
        raise NotImplementedError(f"task {self.name} does not score generations")

    def cut_at_stop(self, text: str) -> str:
        cut = len(text)
        for s in self.stop:
            pos = text.find(s)
            if pos != -1:
                cut = min(cut, pos)
        return text[:cut]

    # -- identity ----------------------------------------------------------------------------------
    def config(self) -> dict:
        return {"task": self.name, "kind": self.kind, "shots": self.shots, "chat": self.chat}

    def fingerprint(self, items: list[Item]) -> str:
        payload = json.dumps({"config": self.config(), "items": [_item_key(i) for i in items]}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _item_key(item: Item) -> dict:
    d = asdict(item)
    d.pop("meta")
    return d
