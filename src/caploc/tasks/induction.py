"""Induction: a sequence of random words, then the same sequence again; predict the next word of the repeat.

The classic behaviour of induction heads (Olsson et al. 2022, "In-context learning and induction heads"):
on a repeated random sequence, a head at the second occurrence of a token attends to the token that followed
its first occurrence and copies it. Nothing but the first occurrence makes the next word predictable, so the
capability is pure in-context copying. Items are seeded and procedurally generated; words come from a fixed
list of common English nouns (single tokens, with their leading space, in most BPE vocabularies), drawn
without replacement so no word repeats within the first occurrence.
"""

from __future__ import annotations

import random

from caploc.errors import require
from caploc.tasks.base import Item, TargetTask

WORDS = (
    "apple", "river", "chair", "window", "garden", "doctor", "bottle", "mountain", "pencil", "forest", "engine",
    "island", "basket", "candle", "rocket", "pocket", "ladder", "mirror", "button", "carpet", "violin", "tiger",
    "rabbit", "orange", "silver", "anchor", "bridge", "castle", "dragon", "feather", "hammer", "jacket",
    "kitten", "lemon", "magnet", "needle", "ocean", "parrot", "planet", "rubber", "saddle", "tunnel", "wallet",
    "zebra", "cookie", "desert", "finger", "guitar", "helmet", "insect", "jungle", "kettle", "lizard", "monkey",
    "napkin", "onion", "pepper", "rainbow", "spider", "turtle", "valley", "wizard", "blanket", "cabbage",
    "dolphin", "elbow", "fountain", "goat", "harbor", "iron", "jelly", "kite", "lamp", "meadow", "nest",
    "oven", "piano", "queen", "robot", "shovel", "table", "umbrella", "village", "wagon", "yacht", "bucket",
    "cloud", "drum", "eagle", "flute", "glove", "horse", "ink", "jar", "key", "leaf", "map", "nail", "owl",
    "pear", "quilt", "ring", "salt", "tent", "vase", "wheel", "bread", "clock", "dress", "fence", "grape",
    "honey", "lion", "mouse", "nurse", "pilot", "shell", "train", "whale", "sugar", "stone", "snake", "cheese",
)


class Induction(TargetTask):
    name = "induction"
    default_metric = "acc"

    def __init__(self, length: int = 12, min_repeat: int = 2):
        super().__init__(shots=0, chat=False)
        require(2 <= length <= len(WORDS), f"{{length}} must be between 2 and {len(WORDS)}", "length")
        require(1 <= min_repeat < length, "{min_repeat} must be at least 1 and below the length", "min_repeat")
        self.length = length
        self.min_repeat = min_repeat

    def config(self) -> dict:
        return super().config() | {"length": self.length, "min_repeat": self.min_repeat}

    def pool(self, seed: int, needed: int) -> list[Item]:
        rng = random.Random(f"induction:{seed}")
        items = []
        for i in range(needed):
            words = rng.sample(WORDS, self.length)
            cut = rng.randrange(self.min_repeat, self.length)  # words of the repeat already shown
            context = " ".join(words) + ". " + " ".join(words[:cut])
            items.append(Item(id=f"induction/{seed}/{i}", context=context, target=" " + words[cut],
                              meta={"position": cut}))
        return items
