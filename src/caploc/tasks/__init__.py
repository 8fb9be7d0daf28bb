"""Task registry: build a task by name (or from a user's own file) with its options."""

from __future__ import annotations

import inspect
from pathlib import Path

from caploc.errors import CaplocError, ParameterError
from caploc.tasks.arithmetic import Arithmetic
from caploc.tasks.base import GenerationTask, Item, LoglikelihoodTask, MultipleChoiceTask, TargetTask, Task
from caploc.tasks.code import MBPP, HumanEval
from caploc.tasks.gsm8k import GSM8K
from caploc.tasks.induction import Induction
from caploc.tasks.ioi import IOI
from caploc.tasks.multiple_choice import (MMLU, ARCChallenge, BoolQ, General, HellaSwag, UserChoiceTask, WMDPBio,
                                          WMDPChem, WMDPCyber)
from caploc.tasks.rhyme import Rhyme
from caploc.tasks.swear import Swear
from caploc.tasks.user import UserTargetTask, user_task

TASKS: dict[str, type[Task]] = {
    "arithmetic": Arithmetic, "gsm8k": GSM8K, "humaneval": HumanEval, "mbpp": MBPP, "swear": Swear,
    "rhyme": Rhyme, "hellaswag": HellaSwag, "arc_challenge": ARCChallenge, "boolq": BoolQ, "mmlu": MMLU,
    "wmdp_bio": WMDPBio, "wmdp_chem": WMDPChem, "wmdp_cyber": WMDPCyber, "general": General,
    "induction": Induction, "ioi": IOI,
}
# general-capability tasks: averaged into the "general" figure of a specificity report
GENERAL_TASKS = ("general", "hellaswag", "arc_challenge", "boolq", "mmlu")
USER_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


def get_task(name: str, **options) -> Task:
    """Build a task by name, or from a user's JSONL/JSON/Parquet file; options that are None keep the
    task's defaults."""
    given = {k: v for k, v in options.items() if v is not None}
    if name not in TASKS and Path(name).suffix.lower() in USER_FILE_SUFFIXES:
        if not Path(name).expanduser().is_file():
            raise CaplocError(f"task file not found: {name}")
        unknown = [k for k in given if k != "subtask"]
        if unknown:
            raise ParameterError("a task file does not take option(s): " + ", ".join("{%s}" % u for u in unknown),
                                 *unknown)
        return user_task(name, given.get("subtask"))
    if name not in TASKS:
        raise CaplocError(f"unknown task {name!r}: choose one of {', '.join(sorted(TASKS))}, "
                          f"or give a JSONL file of your own")
    cls = TASKS[name]
    accepted = inspect.signature(cls.__init__).parameters
    unknown = [k for k in given if k not in accepted]
    if unknown:
        raise ParameterError(f"task {name} does not take option(s): " + ", ".join("{%s}" % u for u in unknown),
                             *unknown)
    return cls(**given)


__all__ = ["Item", "Task", "TargetTask", "MultipleChoiceTask", "GenerationTask", "LoglikelihoodTask", "TASKS", "GENERAL_TASKS", "get_task", "Arithmetic", "GSM8K", "HumanEval", "MBPP",
           "Swear", "Rhyme", "HellaSwag", "ARCChallenge", "BoolQ", "MMLU", "WMDPBio", "WMDPChem", "WMDPCyber",
           "General", "UserChoiceTask", "UserTargetTask", "Induction", "IOI"]
