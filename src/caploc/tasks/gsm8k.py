"""GSM8K (Cobbe et al. 2021) in its own schema: {"question": ..., "answer": "... #### 42"}.

Few-shot `Question: ...\\nAnswer: <reference solution>` exemplars, greedy generation stopped at
`Question:`, scored as lm-evaluation-harness scores it: `acc` by the last number of the output (its
flexible-extract) and `acc_strict` by the number after the output's first `#### ` (its strict-match), each
against the number after the reference's `####`. The two part where the model writes an answer and goes on
(a new question, a new turn) instead of stopping.
"""

from __future__ import annotations

import re

import numpy as np

from caploc.records import load_records, require_fields, split_exemplars
from caploc.errors import CaplocError, ParameterError
from caploc.tasks.base import GenerationTask, Item, register_task

_NUMBER = re.compile(r"-?[\d,\$]*\d(?:\.\d+)?")
_STRICT = re.compile(r"#### (-?[0-9.,]+)")  # lm-eval gsm8k's strict-match, its first match


def normalize_number(text: str) -> str | None:
    cleaned = text.replace(",", "").replace("$", "").strip().rstrip(".")
    if not cleaned:
        return None
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return str(int(value)) if value == int(value) else repr(value)


def reference_answer(answer: str) -> str:
    if "####" not in answer:
        raise CaplocError("GSM8K answer lacks the '#### N' final answer")
    value = normalize_number(answer.split("####")[-1])
    if value is None:
        raise CaplocError(f"GSM8K answer has no number after '####': {answer.split('####')[-1]!r}")
    return value


def last_number(text: str) -> str | None:
    matches = _NUMBER.findall(text)
    return normalize_number(matches[-1]) if matches else None


def format_question(question: str) -> str:
    return f"Question: {question.strip()}\nAnswer:"


@register_task()
class GSM8K(GenerationTask):
    """GSM8K (Cobbe et al. 2021): grade-school math word problems, few-shot chain of thought; the `#### N` answer."""

    name = "gsm8k"
    metrics = ("acc", "acc_strict")
    stop = ("Question:", "\n\n\n")
    max_new_tokens = 256
    has_references = True  # the reference solution, through `#### N`

    def __init__(self, data: str | None = None, fewshot_data: str | None = None, shots: int = 5,
                 chat: bool = False, split: str = "test", fewshot_split: str = "train", config: str = "main"):
        super().__init__(shots=shots, chat=chat)
        if not data:
            raise ParameterError("gsm8k needs {data}: a GSM8K JSONL/Parquet file (question, answer) or an HF id", "data")
        self.data = data
        records = load_records(data, split=split, config=config)
        require_fields(records, ("question", "answer"), data)
        # one file only: its first `shots` records become exemplars and are never scored
        self.exemplars, self.records = split_exemplars("gsm8k", data, records, shots, ("question", "answer"),
                                                       "question", fewshot_data, fewshot_split, config)
        self._prefix = "".join(f"{format_question(r['question'])} {r['answer'].strip()}\n\n" for r in self.exemplars)

    def config(self) -> dict:
        return super().config() | {"data": self.data, "exemplars": [r["question"][:40] for r in self.exemplars]}

    def pool(self, seed: int, needed: int) -> list[Item]:
        items = []
        for i, r in enumerate(self.shuffled(self.records, seed, "gsm8k")):
            items.append(Item(id=str(r.get("id", r["question"][:60])), context=format_question(r["question"]),
                              prefix=self._prefix, answer=reference_answer(r["answer"]),
                              meta={"reference": " " + r["answer"].strip()}))
        return items

    def metric_names(self) -> tuple[str, ...]:
        return self.metrics

    def score(self, item: Item, generated: str) -> float:
        return float(last_number(self.cut_at_stop(generated)) == item.answer)

    def score_strict(self, item: Item, generated: str) -> float:
        found = _STRICT.search(self.cut_at_stop(generated))
        return float(found is not None and normalize_number(found.group(1)) == item.answer)

    def process_generations(self, items: list[Item], texts: list[list[str]]) -> dict[str, np.ndarray]:
        strict = [[self.score_strict(item, t) for item, t in zip(items, row)] for row in texts]
        return super().process_generations(items, texts) | {"acc_strict": np.array(strict, dtype=np.float64)}
