"""The Arithmetic benchmark of Brown et al. (2020), generated deterministically from a seed.

Ten sub-tasks in the original question format, `Question: What is 48 plus 76?\\nAnswer:` with the exact
continuation ` 124` as target (scored by one teacher-forced pass, as evaluation harnesses define acc).
"""

from __future__ import annotations

import random

from caploc.errors import CaplocError
from caploc.tasks.base import Item, TargetTask, register_task

# name -> (aliases as in lm-evaluation-harness)
SUBTASKS = {
    "2D+": "2da", "2D-": "2ds", "3D+": "3da", "3D-": "3ds", "4D+": "4da",
    "4D-": "4ds", "5D+": "5da", "5D-": "5ds", "2Dx": "2dm", "1DC": "1dc",
}
_ALIASES = {k.lower(): k for k in SUBTASKS} | {v: k for k, v in SUBTASKS.items()} | {
    f"arithmetic_{v}": k for k, v in SUBTASKS.items()}


def parse_subtasks(spec: str | None) -> list[str]:
    if not spec or spec.lower() == "all":
        return list(SUBTASKS)
    names = []
    for part in spec.split(","):
        key = part.strip().lower()
        if key not in _ALIASES:
            raise CaplocError(f"unknown arithmetic subtask {part.strip()!r}: choose from {', '.join(SUBTASKS)}")
        names.append(_ALIASES[key])
    return list(dict.fromkeys(names))


def _number(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1), 10 ** digits - 1)


def make_problem(subtask: str, rng: random.Random) -> tuple[str, int]:
    """(question text after 'What is ', integer answer) for one random problem."""
    if subtask == "1DC":
        a, b, c = (rng.randint(0, 9) for _ in range(3))
        op1, op2 = rng.choice("+-*"), rng.choice("+-*")
        if rng.random() < 0.5:
            expr = f"({a} {op1} {b}) {op2} {c}"
        else:
            expr = f"{a} {op1} ({b} {op2} {c})"
        return expr, eval(expr)  # noqa: S307 - expression built from digits and + - * only
    digits = int(subtask[0])
    a, b = _number(rng, digits), _number(rng, digits)
    op = subtask[2:]
    if op == "+":
        return f"{a} plus {b}", a + b
    if op == "-":
        return f"{a} minus {b}", a - b
    return f"{a} times {b}", a * b


def format_question(text: str) -> str:
    return f"Question: What is {text}?\nAnswer:"


@register_task()
class Arithmetic(TargetTask):
    """Brown et al.'s arithmetic: 2-5 digit addition and subtraction, 2-digit multiplication, one-digit composites;
    the answer's log-probability."""

    name = "arithmetic"

    def __init__(self, subtask: str | None = None, shots: int = 3, chat: bool = False):
        super().__init__(shots=shots, chat=chat)
        self.subtasks = parse_subtasks(subtask)

    def config(self) -> dict:
        return super().config() | {"subtasks": self.subtasks}

    def _exemplars(self, subtask: str) -> list[tuple[str, int]]:
        # a stream of its own: exemplars never depend on the item seed and are excluded from items
        rng = random.Random(f"arithmetic-fewshot:{subtask}")
        return [make_problem(subtask, rng) for _ in range(self.shots)]

    def prefix(self, subtask: str) -> str:
        return "".join(f"{format_question(q)} {a}\n\n" for q, a in self._exemplars(subtask))

    def pool(self, seed: int, needed: int) -> list[Item]:
        # round-robin over sub-tasks; each sub-task draws unique problems from its own seeded stream
        per_task = -(-needed // len(self.subtasks))
        streams = {}
        for subtask in self.subtasks:
            rng = random.Random(f"arithmetic:{subtask}:{seed}")
            seen = {q for q, _ in self._exemplars(subtask)}
            problems = []
            attempts = 0
            while len(problems) < per_task and attempts < per_task * 50 + 1000:
                attempts += 1
                q, a = make_problem(subtask, rng)
                if q not in seen:
                    seen.add(q)
                    problems.append((q, a))
            streams[subtask] = problems
        items = []
        for i in range(per_task):
            for subtask in self.subtasks:
                if i < len(streams[subtask]):
                    q, a = streams[subtask][i]
                    items.append(Item(id=f"{subtask}/{seed}/{i}", context=format_question(q),
                                      prefix=self.prefix(subtask), target=f" {a}",
                                      meta={"subtask": subtask}))
        return items[:needed]
