"""Task registry: build a task by name with its options."""

from __future__ import annotations

from caploc.errors import CaplocError
from caploc.tasks.arithmetic import Arithmetic
from caploc.tasks.base import Item, Task
from caploc.tasks.gsm8k import GSM8K

TASKS: dict[str, type[Task]] = {"arithmetic": Arithmetic, "gsm8k": GSM8K}


def get_task(name: str, **options) -> Task:
    """Build a task; options that are None are left at the task's defaults."""
    if name not in TASKS:
        raise CaplocError(f"unknown task {name!r}: choose one of {', '.join(sorted(TASKS))}")
    cls = TASKS[name]
    import inspect

    accepted = inspect.signature(cls.__init__).parameters
    given = {k: v for k, v in options.items() if v is not None}
    unknown = [k for k in given if k not in accepted]
    if unknown:
        raise CaplocError(f"task {name} does not take option(s): {', '.join('--' + u for u in unknown)}")
    return cls(**given)


__all__ = ["Item", "Task", "TASKS", "get_task", "Arithmetic", "GSM8K"]
