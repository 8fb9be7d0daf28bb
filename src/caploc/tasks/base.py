"""Tasks turn dataset items into prompts and own their metrics: they say what to score and turn the model's
raw log-likelihoods or generations into per-item scores (as lm-evaluation-harness tasks own
`process_results`). Three kinds, all evaluated by the one `Evaluator`:
- `TargetTask`: the correct continuation is known (Arithmetic). One teacher-forced pass gives `acc`
  (greedy decoding would produce exactly the target: argmax matches at every target position) and
  `logprob` (log-probability of the target, a continuous score).
- `MultipleChoiceTask`: multiple choice by log-likelihood: `acc`, `acc_norm` (per-character normalized),
  `logprob` of the correct choice, and `logprob_all`, the mean log-likelihood of all choices.
- `GenerationTask`: greedy generation up to a stop string, scored by the task (`score`). Where the task
  knows a reference continuation (a reference solution, the canonical code), its reference view
  (`ReferenceTask`) is the same items as a target task scored by the reference's mean log-probability per
  token (`ref_logprob`): identification by one teacher-forced pass per mask instead of generation, with
  gradients. Any generation task also has an own-reference view (`own_logprob`): the items the unablated
  model does, each with its own greedy completion as the target; built from one generation
  (`OwnReferenceTask.from_generations`).

Tasks register themselves (`@register_task()` on the class): the registry `TASKS` is what builds a task by
name, and what the command line lists. A task's parameters are its `__init__`'s (`caploc.params`).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field, replace
from typing import ClassVar

import numpy as np

from caploc.errors import CaplocError, ParameterError, require
from caploc.params import Registry

KINDS = ("target", "choice", "generate")
TASKS = Registry("task")
REFERENCE_METRIC = "ref_logprob"
OWN_METRIC = "own_logprob"  # the log-probability of the model's own correct completion, mean per token


def register_task(name: str | None = None, **fixed):
    """Class decorator: register a task under `name` (default: the class's `name`)."""
    def add(cls):
        return TASKS.register(name or cls.name, **fixed)(cls)
    return add


@dataclass(frozen=True)
class Item:
    id: str
    context: str  # the item-specific part of the prompt
    prefix: str = ""  # few-shot text shared by many items: computed once per mask and reused
    target: str | None = None  # target tasks
    choices: tuple[str, ...] = ()  # multiple-choice tasks
    label: int | None = None  # multiple-choice tasks: index of the correct choice
    answer: str | None = None  # generation tasks: reference answer for the scorer
    # multiple choice with one context per choice and a shared continuation (WinoGrande's partial scoring:
    # each option fills the blank, the rest of the sentence is scored); empty: `context` serves every choice
    contexts: tuple[str, ...] = ()
    meta: dict = field(default_factory=dict, compare=False, hash=False)


class Task:
    """Base class. Subclasses derive from one of the three kinds below, set `name`, and implement `pool()`
    (the ordered candidate items)."""

    name: ClassVar[str] = "task"
    kind: ClassVar[str] = ""  # recorded in config() (and so in every store key); behaviour comes from the class
    metrics: ClassVar[tuple[str, ...]] = ("acc", "logprob")
    default_metric: ClassVar[str] = "acc"
    linear_metrics: ClassVar[tuple[str, ...]] = ()  # metrics with a gradient (log-likelihood tasks have some)
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    # evidence independent of ablation, for tasks whose heads the literature finds by their attention:
    # (the `head_scores` key the reported heads are checked against, its source)
    attention_check: ClassVar[tuple[str, str] | None] = None

    def __init__(self, shots: int = 0, chat: bool = False):
        require(shots >= 0, "{shots} must be >= 0", "shots")
        self.shots = shots
        self.chat = chat

    # -- items -------------------------------------------------------------------------------------
    def pool(self, seed: int, needed: int) -> list[Item]:
        """At least `needed` items (or all there are) in a seeded, deterministic order."""
        raise NotImplementedError

    def items(self, n: int, seed: int = 0, offset: int = 0) -> list[Item]:
        """Items [offset, offset+n) of the seeded order: disjoint offsets give disjoint item sets."""
        require(n > 0, "{n} must be positive", "n")
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

    # -- metrics -----------------------------------------------------------------------------------
    def metric_names(self) -> tuple[str, ...]:
        """Every metric this task's evaluation yields, per item."""
        raise NotImplementedError

    @property
    def identification_metric(self) -> str:
        """What localization optimizes by default: the answer's log-probability where it is known (far
        less noise per item than 0/1 accuracy), the task's own score otherwise."""
        return self.default_metric

    @property
    def universality_metric(self) -> str:
        """The signal of a degenerate model: likelihood of the answer, of all choices, or the score."""
        return self.default_metric

    def has_gradient(self, metric: str) -> bool:
        """Whether `metric` is linear in the continuations' log-probabilities (so AtP can differentiate it)."""
        return metric in self.linear_metrics

    def from_source(self, items: list[Item]) -> list[Item]:
        """Items drawn from the task whose `scorings()` hold this one, in this one's form: here, unchanged."""
        return items

    def scorings(self) -> list["Task"]:
        """The tasks that together give every metric of this one: itself, and the reference view of a
        generation task that has references."""
        return [self]

    def for_metric(self, metric: str) -> "Task":
        """The task that computes `metric`: this one, or the one of `scorings()` that has it."""
        for task in self.scorings():
            if metric in task.metric_names():
                return task
        names = [m for t in self.scorings() for m in t.metric_names()]
        raise ParameterError(f"task {self.name} has no {{metric}} {metric!r}: use {', '.join(names)}", "metric")

    @classmethod
    def head_scores(cls, lm, seed: int = 0) -> dict[str, np.ndarray] | None:
        """Per head, [n_layers, n_heads], attention signatures of the heads the literature finds for this
        task, independent of ablation (`heads --scores TASK`); None for tasks without one."""
        return None

    # -- identity ----------------------------------------------------------------------------------
    def config(self) -> dict:
        return {"task": self.name, "kind": self.kind, "shots": self.shots, "chat": self.chat}

    def fingerprint(self, items: list[Item]) -> str:
        payload = json.dumps({"config": self.config(), "items": [_item_key(i) for i in items]}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


class LoglikelihoodTask(Task):
    """Scored from teacher-forced passes over prompt + each continuation."""

    # metrics that are linear in the continuations' log-probabilities: they have gradients
    linear_metrics: ClassVar[tuple[str, ...]] = ("logprob",)

    @property
    def identification_metric(self) -> str:
        return "logprob"

    def continuations(self, item: Item) -> list[str]:
        raise NotImplementedError

    def answer_index(self, item: Item) -> int:
        """Which continuation is the correct answer."""
        raise NotImplementedError

    def process_loglikelihoods(self, items: list[Item], logprob: list[np.ndarray], greedy: list[np.ndarray],
                               lengths: list[np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """logprob[i], greedy[i]: [n_masks, n_continuations of item i] log-probability of each continuation
        and whether greedy decoding reproduces it; lengths[i]: each continuation's tokens. Returns
        {metric: [n_masks, n_items]}."""
        raise NotImplementedError


class TargetTask(LoglikelihoodTask):
    kind = "target"

    def metric_names(self) -> tuple[str, ...]:
        return ("acc", "logprob")

    def continuations(self, item: Item) -> list[str]:
        return [item.target]

    def answer_index(self, item: Item) -> int:
        return 0

    @property
    def universality_metric(self) -> str:
        return "logprob"

    def process_loglikelihoods(self, items, logprob, greedy, lengths=None):
        return {"acc": np.stack([g[:, 0] for g in greedy], axis=1).astype(np.float64),
                "logprob": np.stack([lp[:, 0] for lp in logprob], axis=1)}


class MultipleChoiceTask(LoglikelihoodTask):
    kind = "choice"
    metrics = ("acc", "acc_norm", "logprob")
    linear_metrics = ("logprob", "logprob_all")

    def metric_names(self) -> tuple[str, ...]:
        return ("acc", "acc_norm", "logprob", "logprob_all")

    def continuations(self, item: Item) -> list[str]:
        if item.label is None:
            raise CaplocError(f"item {item.id} has no label")
        return list(item.choices)

    def answer_index(self, item: Item) -> int:
        return item.label

    @property
    def universality_metric(self) -> str:
        return "logprob_all"  # mean log-likelihood over every choice: collapses under universal heads

    def process_loglikelihoods(self, items, logprob, greedy, lengths=None):
        n_masks = logprob[0].shape[0]
        out = {m: np.zeros((n_masks, len(items))) for m in self.metric_names()}
        for i, (item, lp) in enumerate(zip(items, logprob)):
            chars = np.array([len(c) for c in item.choices], dtype=np.float64)
            out["acc"][:, i] = lp.argmax(axis=1) == item.label
            out["acc_norm"][:, i] = (lp / chars).argmax(axis=1) == item.label
            out["logprob"][:, i] = lp[:, item.label]
            out["logprob_all"][:, i] = lp.mean(axis=1)
        return out


class GenerationTask(Task):
    kind = "generate"

    def metric_names(self) -> tuple[str, ...]:
        return self.metrics[:1]

    has_references: ClassVar[bool] = False  # its items carry meta["reference"]: the reference view exists

    def reference(self, item: Item) -> str | None:
        """The reference continuation of an item (what a correct answer looks like, written out), if known."""
        return item.meta.get("reference")

    @property
    def identification_metric(self) -> str:
        """The reference's log-probability per token where the task has references (one teacher-forced pass
        per mask, with gradients), else the task's own score."""
        return REFERENCE_METRIC if self.has_references else self.default_metric

    def scorings(self) -> list[Task]:
        return [self, ReferenceTask(self)] if self.has_references else [self]

    def for_metric(self, metric: str) -> Task:
        # the own-reference view is not among scorings(): its items need the model's generations
        return OwnReferenceTask(self) if metric == OWN_METRIC else super().for_metric(metric)

    def score(self, item: Item, generated: str) -> float:
        raise NotImplementedError(f"task {self.name} does not score generations")

    def cut_at_stop(self, text: str) -> str:
        cut = len(text)
        for s in self.stop:
            pos = text.find(s)
            if pos != -1:
                cut = min(cut, pos)
        return text[:cut]

    def process_generations(self, items: list[Item], texts: list[list[str]]) -> dict[str, np.ndarray]:
        """texts[m][i]: what the model wrote for item i under mask m (already cut at the stop strings)."""
        scores = np.array([[self.score(item, t) for item, t in zip(items, row)] for row in texts], dtype=np.float64)
        return {self.metric_names()[0]: scores.reshape(len(texts), len(items))}


def _item_key(item: Item) -> dict:
    d = asdict(item)
    d.pop("meta")
    if not d["contexts"]:  # keys written before per-choice contexts existed stay valid
        d.pop("contexts")
    return d


class ReferenceTask(TargetTask):
    """A generation task's items with their reference as the known target: `ref_logprob`, the reference's
    mean log-probability per token (the identification metric of generation tasks), and `logprob`, its sum.
    Its config is the task's, marked, so its evaluations are stored apart from the generations."""

    kind = "target"
    metric: ClassVar[str] = REFERENCE_METRIC
    linear_metrics = ("logprob", REFERENCE_METRIC)
    scored: ClassVar[str] = "reference"

    def __init__(self, source: GenerationTask):
        super().__init__(shots=source.shots, chat=source.chat)
        self.source = source
        self.name = source.name

    def metric_names(self) -> tuple[str, ...]:
        return (self.metric, "logprob")

    @property
    def identification_metric(self) -> str:
        return self.metric

    @property
    def universality_metric(self) -> str:
        return self.metric

    def config(self) -> dict:
        return self.source.config() | {"scored": self.scored}

    def pool(self, seed: int, needed: int) -> list[Item]:
        return self.from_source(self.source.pool(seed, needed))

    def from_source(self, items: list[Item]) -> list[Item]:
        return [self.with_reference(item) for item in items]

    def with_reference(self, item: Item) -> Item:
        reference = self.source.reference(item)
        if not reference:
            raise CaplocError(f"{self.name}: item {item.id} has no reference continuation")
        return replace(item, target=reference)

    def process_loglikelihoods(self, items, logprob, greedy, lengths=None):
        total = np.stack([lp[:, 0] for lp in logprob], axis=1)
        if lengths is None:
            raise CaplocError(f"{self.metric} needs the continuations' token counts")
        tokens = np.array([n[0] for n in lengths], dtype=np.float64)
        return {self.metric: total / tokens[None], "logprob": total}


class OwnReferenceTask(ReferenceTask):
    """A generation task's items that the unablated model does (its score above 0: a right answer, a passing
    program, a swear word), each with the model's own greedy completion as the target: `own_logprob`, that
    completion's mean log-probability per token. What an ablation must break to change the real metric is the
    model's own solution, not a reference written in another style; and tasks without references get a
    teacher-forced metric too. The items come from one generation (`from_generations`), not from the pool."""

    metric = OWN_METRIC
    linear_metrics = ("logprob", OWN_METRIC)
    scored = "own"

    def pool(self, seed: int, needed: int) -> list[Item]:
        raise CaplocError(f"{self.metric}: the items of {self.name} come from the model's own generations "
                          "(OwnReferenceTask.from_generations), not from the task's pool")

    def from_source(self, items: list[Item]) -> list[Item]:
        raise CaplocError(f"{self.metric}: the model's completions of {self.name} are needed "
                          "(OwnReferenceTask.from_generations)")

    def from_generations(self, items: list[Item], texts: list[str], scores) -> list[Item]:
        """The items whose completion scored above 0 (and is not empty), with that completion as the target."""
        return [replace(item, target=text) for item, text, score in zip(items, texts, scores)
                if score > 0 and text.strip()]
