"""Indirect object identification (Wang et al. 2022, "Interpretability in the wild"): in "When Mary and John
went to the store, John gave a drink to", the model should name the indirect object (Mary), not the subject
who appears twice (John).

Templates follow the paper's form (two names introduced together, the subject repeated, then "gave ... to");
names are common first names, places and objects everyday nouns, all chosen with a seeded generator; the
two orders of the names in the first clause (ABBA and BABA) alternate. Scored as a two-way choice between
the names: `acc` (the indirect object is more likely) and `logit_diff`, the log-probability of the indirect
object minus that of the subject, which for single-token names equals their logit difference, the paper's
metric. Localization uses `logit_diff`.
"""

from __future__ import annotations

import random

import numpy as np

from caploc.hooks import attention_weights
from caploc.tasks.base import Item, MultipleChoiceTask, register_task

NAMES = ("Mary", "John", "Tom", "James", "Anna", "Paul", "Sarah", "David", "Emma", "Mark", "Laura", "Peter",
         "Kate", "Daniel", "Lucy", "Steve", "Alice", "Brian", "Helen", "Robert", "Susan", "Kevin", "Julia",
         "Frank", "Grace", "George", "Linda", "Henry", "Rose", "Jack")
PLACES = ("store", "garden", "restaurant", "school", "hospital", "office", "station", "park", "beach", "market",
          "library", "kitchen")
OBJECTS = ("drink", "ring", "book", "ball", "snack", "bag", "letter", "key", "gift", "basket", "flower", "pen")
# {A} and {B} are introduced, {S} (one of them) repeats; the answer is the other one
TEMPLATES = (
    "When {A} and {B} went to the {place}, {S} gave a {obj} to",
    "Then, {A} and {B} went to the {place}. {S} gave a {obj} to",
    "After {A} and {B} went to the {place}, {S} handed a {obj} to",
    "While {A} and {B} were working at the {place}, {S} gave a {obj} to",
    "When {A} and {B} got a {obj} at the {place}, {S} decided to give it to",
    "Friends {A} and {B} found a {obj} at the {place}. {S} gave it to",
    "Then, {A} and {B} had a lot of fun at the {place}. {S} gave a {obj} to",
    "{A} and {B} were at the {place}. Later, {S} passed the {obj} to",
)


@register_task()
class IOI(MultipleChoiceTask):
    """Indirect object identification (Wang et al. 2022): the indirect object's logit against the subject's."""

    name = "ioi"
    attention_check = ("name_mover", "Wang et al. 2022, last token to the indirect object")
    metrics = ("acc", "logit_diff")
    linear_metrics = ("logprob", "logprob_all", "logit_diff")
    default_metric = "acc"

    def __init__(self):
        super().__init__(shots=0, chat=False)

    def metric_names(self) -> tuple[str, ...]:
        return super().metric_names() + ("logit_diff",)

    @property
    def identification_metric(self) -> str:
        return "logit_diff"

    def process_loglikelihoods(self, items, logprob, greedy, lengths=None):
        out = super().process_loglikelihoods(items, logprob, greedy, lengths)
        out["logit_diff"] = np.stack([lp[:, item.label] - lp[:, 1 - item.label] for item, lp in zip(items, logprob)],
                                     axis=1)
        return out

    def pool(self, seed: int, needed: int) -> list[Item]:
        rng = random.Random(f"ioi:{seed}")
        items = []
        for i in range(needed):
            io, subject = rng.sample(NAMES, 2)
            first, second = (io, subject) if i % 2 == 0 else (subject, io)  # ABBA and BABA orders
            template = rng.choice(TEMPLATES)
            context = template.format(A=first, B=second, S=subject, place=rng.choice(PLACES), obj=rng.choice(OBJECTS))
            label = rng.randrange(2)
            choices = (" " + io, " " + subject) if label == 0 else (" " + subject, " " + io)
            items.append(Item(id=f"ioi/{seed}/{i}", context=context, choices=choices, label=label,
                              meta={"indirect_object": io, "subject": subject}))
        return items

    @classmethod
    def head_scores(cls, lm, seed: int = 0, n: int = 40) -> dict[str, np.ndarray]:
        """Per head, [n_layers, n_heads], on `ioi` prompts (seeded, one forward pass each), the attention from
        the last token (where the name is predicted) to the indirect object's name (`name_mover`: Wang et
        al. 2022's name-mover heads attend there and copy it) and to the subject's first mention (`subject`)."""
        tok = lm.tokenizer
        batches, positions = [], []
        for item in cls().items(n, seed):
            context = item.context

            def position(name: str) -> int:  # the token that ends the name's first mention (the prompt's prefix)
                end = context.index(name) + len(name)
                return len(tok(context[:end])["input_ids"]) - 1

            batches.append(tok(context, return_tensors="pt")["input_ids"])
            positions.append((position(item.meta["indirect_object"]), position(item.meta["subject"])))
        weights = attention_weights(lm.model, batches)
        out = {}
        for key, which in (("name_mover", 0), ("subject", 1)):
            out[key] = np.stack([np.mean([layers[layer][0, :, -1, pos[which]].numpy()
                                          for layers, pos in zip(weights, positions)], axis=0)
                                 for layer in range(len(weights[0]))])
        return out
