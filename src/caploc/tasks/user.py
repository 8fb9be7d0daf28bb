"""A task from a user's own file, by path: `--task my_items.jsonl`.

The first record decides the kind:
- known target (scored like Arithmetic: greedy exact match and log-probability, one teacher-forced pass):
  {"prompt": "Q: capital of Peru?\\nA:", "target": " Lima", "id": "optional", "prefix": "optional shared text"}
  The target is the exact continuation, leading space included.
- multiple choice: {"prompt": ..., "choices": [...], "answer": <index>} (see UserChoiceTask).
"""

from __future__ import annotations

from pathlib import Path

from caploc.records import load_records, require_fields
from caploc.errors import CaplocError
from caploc.tasks.base import Item, TargetTask, Task
from caploc.tasks.multiple_choice import UserChoiceTask, by_category


class UserTargetTask(TargetTask):

    def __init__(self, data: str, subtask: str | None = None):
        super().__init__(shots=0, chat=False)
        self.name = Path(data).stem
        self.data = data
        records = load_records(data)
        require_fields(records, ("prompt", "target"), data)
        if subtask:
            records = by_category(records, subtask)
            if not records:
                raise CaplocError(f"{data}: no records with category in {subtask}")
        self.records = records

    def config(self) -> dict:
        return super().config() | {"data": self.data}

    def pool(self, seed: int, needed: int) -> list[Item]:
        items = []
        for i, r in enumerate(self.records):
            if not str(r["target"]):
                raise CaplocError(f"{self.data}: record {i} has an empty target")
            items.append(Item(id=str(r.get("id", i)), prefix=r.get("prefix", ""), context=r["prompt"],
                              target=str(r["target"])))
        return self.shuffled(items, seed, self.name)


def user_task(path: str, subtask: str | None = None) -> Task:
    first = load_records(path)[0]
    if "choices" in first:
        return UserChoiceTask(path, subtask=subtask)
    if "target" in first:
        return UserTargetTask(path, subtask=subtask)
    raise CaplocError(f"{path}: records need 'prompt' plus 'target' (known answer) or 'choices' and 'answer' "
                      f"(multiple choice); the first record has {', '.join(sorted(first)) or 'no fields'}")
