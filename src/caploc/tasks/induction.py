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

import numpy as np
import torch

from caploc.errors import require
from caploc.hooks import attention_weights
from caploc.tasks.base import Item, TargetTask, register_task

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


@register_task()
class Induction(TargetTask):
    """Induction: a random word sequence repeated; predict the next word of the repeat."""

    name = "induction"
    default_metric = "acc"
    attention_check = ("prefix_matching", "Olsson et al. 2022, repeated random tokens")

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

    @classmethod
    def head_scores(cls, lm, seed: int = 0, n: int = 8, length: int = 40) -> dict[str, np.ndarray]:
        """Per head, [n_layers, n_heads], on random token sequences repeated twice (one forward pass), the two
        attention signatures of the induction circuit (Olsson et al. 2022), independent of ablation:
        `prefix_matching` - the mean attention from each token of the repeat to the token that followed its
        first occurrence (induction heads score near 1); `previous_token` - the mean attention from each
        token to the one before it (the heads whose output induction heads' keys read)."""
        tok = lm.tokenizer
        special = set(tok.all_special_ids)
        ordinary = torch.tensor([i for i in range(min(len(tok), lm.model.config.vocab_size)) if i not in special])
        g = torch.Generator().manual_seed(seed)
        first = ordinary[torch.randint(0, len(ordinary), (n, length), generator=g)]
        ids = torch.cat([first, first], dim=1)
        offset = 0
        if tok.bos_token_id is not None:
            ids = torch.cat([torch.full((n, 1), tok.bos_token_id), ids], dim=1)
            offset = 1
        return attention_signatures(attention_weights(lm.model, [ids])[0], length, offset)


def attention_signatures(attentions: list[torch.Tensor], length: int, offset: int) -> dict[str, np.ndarray]:
    """From per-layer attention weights [batch, heads, T, T] over `offset` leading tokens and a sequence of
    `length` tokens repeated twice: the prefix-matching and previous-token scores of every head."""
    queries = torch.arange(offset + length + 1, offset + 2 * length)  # second occurrence, after its first token
    keys = queries - length + 1  # the token after the query token's first occurrence
    # previous token, from the second token of the sequence on (the first has only what precedes the sequence)
    later = torch.arange(offset + 1, offset + 2 * length)
    return {"prefix_matching": np.stack([a[:, :, queries, keys].mean(dim=(0, 2)).numpy() for a in attentions]),
            "previous_token": np.stack([a[:, :, later, later - 1].mean(dim=(0, 2)).numpy() for a in attentions])}
