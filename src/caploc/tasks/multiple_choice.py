"""Multiple choice by log-likelihood, each dataset read in its own native schema.

Prompts and scoring follow lm-evaluation-harness, which is how the paper evaluated them:
- hellaswag (Rowan/hellaswag): "{activity}: {ctx_a} {Ctx_b}" + " {ending}", acc_norm.
- arc_challenge (allenai/ai2_arc, ARC-Challenge): "Question: {q}\\nAnswer:" + " {choice}", acc_norm.
- boolq (google/boolq or super_glue/boolq): "{passage}\\nQuestion: {q}?\\nAnswer:" + " no"/" yes", acc.
- mmlu (cais/mmlu): 0-shot "The following are multiple choice questions (with answers) about {subject}."
  header, lettered options, " A"/" B"/" C"/" D", acc; `--subtask` picks subjects (comma-separated).
- wmdp_bio / wmdp_chem / wmdp_cyber (cais/wmdp): as MMLU, acc.
- general: caploc's own offline set (205 items: everyday knowledge, commonsense, reading comprehension,
  word sense; `--subtask` picks categories), acc.
- any JSONL/JSON/Parquet file of your own, by path (see `UserChoiceTask` for the schema).

Each task reads `--data` (a local file in the dataset's schema, or an HF id) and defaults to the dataset's
hub id, which needs a network; offline, point `--data` at a local copy.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from caploc.data import load_records, require_fields
from caploc.errors import CaplocError, ParameterError
from caploc.tasks.base import Item, MultipleChoiceTask

LETTERS = "ABCDEFGHIJ"


class ChoiceTask(MultipleChoiceTask):
    """A multiple-choice dataset read from a file or the hub."""

    default_metric = "acc"
    hub_id: str = ""
    hub_config: str | None = None
    hub_split: str = "test"
    fields: tuple[str, ...] = ()

    def __init__(self, data: str | None = None, split: str | None = None, subtask: str | None = None):
        super().__init__(shots=0, chat=False)
        self.data = data or self.hub_id
        self.subtask = subtask
        records = load_records(self.data, split=split or self.hub_split, config=self.hub_config)
        require_fields(records, self.fields, self.data)
        self.records = self.select(records, subtask)
        if not self.records:
            raise ParameterError(f"{self.name}: no items in {self.data} match {{subtask}} {subtask}", "subtask")

    def select(self, records: list[dict], subtask: str | None) -> list[dict]:
        if subtask:
            raise CaplocError(f"task {self.name} has no sub-tasks")
        return records

    def config(self) -> dict:
        return super().config() | {"data": self.data, "subtask": self.subtask}

    def to_item(self, record: dict, index: int) -> Item:
        raise NotImplementedError

    def pool(self, seed: int, needed: int) -> list[Item]:
        items = [self.to_item(r, i) for i, r in enumerate(self.records)]
        return self.shuffled(items, seed, self.name)


def _label(value, labels: list[str], source: str) -> int:
    """An answer given as an index, a digit string, or one of `labels` (A/B/C/D, 1/2/3/4)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if text in labels:
        return labels.index(text)
    if text.isdigit():
        return int(text)
    raise CaplocError(f"{source}: cannot read answer {value!r} (expected one of {', '.join(labels)})")


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


class HellaSwag(ChoiceTask):
    name = "hellaswag"
    default_metric = "acc_norm"
    hub_id, hub_split = "Rowan/hellaswag", "validation"
    fields = ("ctx_a", "ctx_b", "endings", "label")

    def to_item(self, r: dict, i: int) -> Item:
        context = _hellaswag_clean(f"{r.get('activity_label', '')}: {r['ctx_a']} {r['ctx_b'].capitalize()}")
        return Item(id=str(r.get("ind", i)), context=context,
                    choices=tuple(" " + _hellaswag_clean(e) for e in r["endings"]),
                    label=_label(r["label"], [], self.data))


class ARCChallenge(ChoiceTask):
    name = "arc_challenge"
    default_metric = "acc_norm"
    hub_id, hub_config = "allenai/ai2_arc", "ARC-Challenge"
    fields = ("question", "choices", "answerKey")

    def to_item(self, r: dict, i: int) -> Item:
        choices = r["choices"]
        return Item(id=str(r.get("id", i)), context=f"Question: {r['question']}\nAnswer:",
                    choices=tuple(" " + t for t in choices["text"]),
                    label=_label(r["answerKey"], list(choices["label"]), self.data))


class BoolQ(ChoiceTask):
    name = "boolq"
    hub_id, hub_split = "google/boolq", "validation"
    fields = ("question", "passage")

    def to_item(self, r: dict, i: int) -> Item:
        if "answer" in r:  # google/boolq: answer true/false; super_glue: label 0/1
            label = int(bool(r["answer"]))
        elif "label" in r:
            label = int(r["label"])
        else:
            raise CaplocError(f"{self.data}: record {i} has neither 'answer' nor 'label'")
        return Item(id=str(r.get("idx", i)), context=f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:",
                    choices=(" no", " yes"), label=label)


def lettered_question(question: str, choices: list[str]) -> str:
    options = "".join(f"{LETTERS[j]}. {c}\n" for j, c in enumerate(choices))
    return f"{question.strip()}\n{options}Answer:"


class MMLU(ChoiceTask):
    name = "mmlu"
    hub_id, hub_config = "cais/mmlu", "all"
    fields = ("question", "choices", "answer")
    subject_field = "subject"

    def select(self, records, subtask):
        if not subtask:
            return records
        wanted = {s.strip() for s in subtask.split(",")}
        known = {r.get(self.subject_field) for r in records}
        unknown = wanted - known
        if unknown:
            raise CaplocError(f"{self.name}: unknown subject(s) {', '.join(sorted(unknown))}; "
                              f"available: {', '.join(sorted(str(k) for k in known))}")
        return [r for r in records if r.get(self.subject_field) in wanted]

    def subject(self, r: dict) -> str:
        return str(r.get(self.subject_field) or "general knowledge").replace("_", " ")

    def to_item(self, r: dict, i: int) -> Item:
        choices = list(r["choices"])
        header = f"The following are multiple choice questions (with answers) about {self.subject(r)}.\n\n"
        return Item(id=str(r.get("id", i)), prefix=header, context=lettered_question(r["question"], choices),
                    choices=tuple(" " + LETTERS[j] for j in range(len(choices))),
                    label=_label(r["answer"], list(LETTERS[: len(choices)]), self.data))


class WMDP(MMLU):
    hub_id = "cais/wmdp"
    topic = ""

    def __init__(self, data: str | None = None, split: str | None = None):
        self.hub_config = f"wmdp-{self.name.split('_')[1]}"
        super().__init__(data, split)

    def select(self, records, subtask):
        return records

    def subject(self, r: dict) -> str:
        return self.topic


class WMDPBio(WMDP):
    name, topic = "wmdp_bio", "biology"


class WMDPChem(WMDP):
    name, topic = "wmdp_chem", "chemistry"


class WMDPCyber(WMDP):
    name, topic = "wmdp_cyber", "computer security"


class UserChoiceTask(ChoiceTask):
    """A user's own multiple-choice JSONL/JSON/Parquet file, one record per item:
    {"prompt": "Question: ...\\nAnswer:", "choices": ["...", "..."], "answer": 1, "id": "optional",
     "category": "optional (selectable with --subtask)", "prefix": "optional text shared by many items"}.
    Each choice is scored as the continuation " {choice}"; "answer" is the index of the correct choice."""

    name = "user"
    fields = ("prompt", "choices", "answer")

    def __init__(self, data: str, split: str | None = None, subtask: str | None = None):
        self.name = Path(data).stem
        super().__init__(data, split, subtask)

    def select(self, records, subtask):
        return by_category(records, subtask)

    def to_item(self, r: dict, i: int) -> Item:
        choices = list(r["choices"])
        label = _label(r["answer"], list(LETTERS[: len(choices)]), self.data)
        if not 0 <= label < len(choices):
            raise CaplocError(f"{self.data}: record {i} answer {r['answer']!r} is not a choice index")
        return Item(id=str(r.get("id", i)), prefix=r.get("prefix", ""), context=r["prompt"],
                    choices=tuple(" " + str(c) for c in choices), label=label, meta={"category": r.get("category")})


def by_category(records: list[dict], subtask: str | None) -> list[dict]:
    """The records whose "category" is one of the comma-separated `subtask` (all when it is empty)."""
    if not subtask:
        return records
    wanted = {s.strip() for s in subtask.split(",")}
    return [r for r in records if r.get("category") in wanted]


GENERAL_FILE = "general.jsonl"


class General(UserChoiceTask):
    """caploc's offline general-capability set (tools/build_general.py writes it); `--data` may point
    at another file in the same schema."""

    def __init__(self, data: str | None = None, subtask: str | None = None):
        path = data or str(resources.files("caploc") / "data" / GENERAL_FILE)
        super().__init__(path, subtask=subtask)
        self.name = "general"
        self.data = data or "caploc:general"  # the packaged set is identified by name, not install path
