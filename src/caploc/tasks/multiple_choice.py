"""Multiple choice by log-likelihood from datasets in their own layouts, and the user's own files.

A `DatasetChoiceTask` knows one or more `RecordLayout`s of its dataset (the original release and the HF layout, say), tells
them apart from the records themselves, and turns every record into an `Item` when the task is built, so a
bad record is reported at once, with its file, number and field (`caploc.records.Record`). The datasets of the
standard suite live in `caploc.tasks.benchmarks`; this module holds the machinery, the user's own files and
caploc's offline `general` set.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

from caploc.records import Record, RecordError, load_records
from caploc.errors import CaplocError, ParameterError
from caploc.tasks.base import Item, MultipleChoiceTask, register_task

LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class RecordLayout:
    """One way a dataset's records are written: `fields` identify it (dotted paths reach into objects),
    `to_item(task, record)` reads one."""

    name: str
    fields: tuple[str, ...]
    to_item: Callable[["DatasetChoiceTask", Record], Item]
    matches: Callable[[Record], bool] | None = None  # a finer test where fields alone do not decide

    def recognizes(self, record: Record) -> bool:
        if not all(_has(record, f) for f in self.fields):
            return False
        return self.matches is None or self.matches(record)


def _has(record: dict, path: str) -> bool:
    node = record
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


class DatasetChoiceTask(MultipleChoiceTask):
    """A multiple-choice dataset read from a file, a directory of files, or the hub."""

    default_metric = "acc"
    hub_id: str = ""
    hub_config: str | None = None
    hub_split: str = "test"
    layouts: tuple[RecordLayout, ...] = ()
    csv_columns: tuple[str, ...] | None = None  # column names of headerless release CSVs

    def __init__(self, data: str | None = None, split: str | None = None, subtask: str | None = None):
        super().__init__(shots=0, chat=False)
        self.data = data or self.hub_id
        self.subtask = subtask
        records = self.read(self.data, split or self.hub_split)
        self.layout = self.detect(records[0])
        items = [self.layout.to_item(self, r) for r in records]  # every record read now: errors surface here
        self.item_list = self.select(items, subtask)
        kept = {id(i) for i in self.item_list}
        self.records = [r for r, item in zip(records, items) if id(item) in kept]
        if not self.item_list:
            raise ParameterError(f"{self.name}: no items in {self.data} match {{subtask}} {subtask}", "subtask")

    def read(self, data: str, split: str) -> list[Record]:
        return load_records(data, split=split, config=self.hub_config, csv_columns=self.csv_columns)

    def detect(self, record: Record) -> RecordLayout:
        for layout in self.layouts:
            if layout.recognizes(record):
                return layout
        closest = max(self.layouts, key=lambda layout: sum(_has(record, f) for f in layout.fields))
        missing = [f for f in closest.fields if not _has(record, f)]
        if 0 < len(missing) < len(closest.fields):
            raise RecordError(f"{record.where()}: field(s) {', '.join(map(repr, missing))} missing "
                              f"({self.name}, {closest.name} layout: {', '.join(closest.fields)})")
        known = "; ".join(f"{layout.name}: {', '.join(layout.fields)}" for layout in self.layouts)
        raise RecordError(f"{record.where()}: not a {self.name} record in any layout caploc reads ({known}); "
                          f"it has fields {', '.join(map(str, record)) or 'none'}")

    def select(self, items: list[Item], subtask: str | None) -> list[Item]:
        if subtask:
            raise CaplocError(f"task {self.name} has no sub-tasks")
        return items

    def config(self) -> dict:
        return super().config() | {"data": self.data, "subtask": self.subtask}

    def pool(self, seed: int, needed: int) -> list[Item]:
        return self.shuffled(self.item_list, seed, self.name)


def record_id(record: Record, *fields: str) -> str:
    """The record's own id (the first of `fields` it has), else its 0-based position in what was read."""
    for f in fields:
        if record.get(f) not in (None, ""):
            return str(record[f])
    return str(record.position)


def lettered_question(question: str, choices: list[str]) -> str:
    options = "".join(f"{LETTERS[j]}. {c}\n" for j, c in enumerate(choices))
    return f"{question.strip()}\n{options}Answer:"


def lettered_choices(n: int) -> tuple[str, ...]:
    return tuple(" " + LETTERS[j] for j in range(n))


class UserChoiceTask(DatasetChoiceTask):
    """A user's own multiple-choice JSONL/JSON/CSV/Parquet file, one record per item:
    {"prompt": "Question: ...\\nAnswer:", "choices": ["...", "..."], "answer": 1, "id": "optional",
     "category": "optional (selectable with --subtask)", "prefix": "optional text shared by many items"}.
    Each choice is scored as the continuation " {choice}"; "answer" is the index of the correct choice (or
    its letter)."""

    name = "user"

    def _user_item(self, r: Record) -> Item:
        choices = r.texts("choices")
        label = r.choice("answer", list(LETTERS[: len(choices)]))
        return Item(id=record_id(r, "id"), prefix=str(r.get("prefix") or ""), context=r.text("prompt"),
                    choices=tuple(" " + c for c in choices), label=label, meta={"category": r.get("category")})

    layouts = (RecordLayout("caploc multiple choice", ("prompt", "choices", "answer"), _user_item),)

    def __init__(self, data: str, split: str | None = None, subtask: str | None = None):
        self.name = Path(data).stem
        super().__init__(data, split, subtask)

    def select(self, items, subtask):
        return by_category(items, subtask)


def by_category(items: list, subtask: str | None) -> list:
    """The items (or records) whose category is one of the comma-separated `subtask` (all when empty)."""
    if not subtask:
        return items
    wanted = {s.strip() for s in subtask.split(",")}
    return [i for i in items if (i.meta if isinstance(i, Item) else i).get("category") in wanted]


GENERAL_FILE = "general.jsonl"


@register_task()
class General(UserChoiceTask):
    """caploc's offline general-capability set (tools/build_general.py writes it); `--data` may point
    at another file in the same schema."""

    name = "general"

    def __init__(self, data: str | None = None, subtask: str | None = None):
        path = data or str(resources.files("caploc") / "data" / GENERAL_FILE)
        super().__init__(path, subtask=subtask)
        self.name = "general"
        self.data = data or "caploc:general"  # the packaged set is identified by name, not install path
