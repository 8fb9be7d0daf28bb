"""Task registry: build a task by name (or from a user's own file) with its options."""

from __future__ import annotations

import inspect
from pathlib import Path

from caploc.data import file_format
from caploc.errors import CaplocError, ParameterError
from caploc.tasks.arithmetic import Arithmetic
from caploc.tasks.base import GenerationTask, Item, LoglikelihoodTask, MultipleChoiceTask, TargetTask, Task
from caploc.tasks.benchmarks import (MMLU, PIQA, ARCChallenge, ARCEasy, BoolQ, CommonsenseQA, HellaSwag,
                                     LambadaOpenAI, OpenBookQA, SciQ, TruthfulQAMC1, TruthfulQAMC2, WinoGrande,
                                     WMDPBio, WMDPChem, WMDPCyber)
from caploc.tasks.code import MBPP, HumanEval
from caploc.tasks.gsm8k import GSM8K
from caploc.tasks.induction import Induction
from caploc.tasks.ioi import IOI
from caploc.tasks.multiple_choice import General, UserChoiceTask
from caploc.tasks.rhyme import Rhyme
from caploc.tasks.swear import Swear
from caploc.tasks.text import TextPerplexity
from caploc.tasks.user import UserTargetTask, user_task

TASKS: dict[str, type[Task]] = {
    "arithmetic": Arithmetic, "gsm8k": GSM8K, "humaneval": HumanEval, "mbpp": MBPP, "swear": Swear,
    "rhyme": Rhyme, "hellaswag": HellaSwag, "arc_challenge": ARCChallenge, "arc_easy": ARCEasy, "boolq": BoolQ,
    "mmlu": MMLU, "piqa": PIQA, "winogrande": WinoGrande, "openbookqa": OpenBookQA, "commonsense_qa": CommonsenseQA,
    "sciq": SciQ, "lambada_openai": LambadaOpenAI, "truthfulqa_mc1": TruthfulQAMC1, "truthfulqa_mc2": TruthfulQAMC2,
    "wmdp_bio": WMDPBio, "wmdp_chem": WMDPChem, "wmdp_cyber": WMDPCyber, "general": General,
    "induction": Induction, "ioi": IOI, "text": TextPerplexity,
}
# general-capability tasks: averaged into the "general" figure of a specificity report
GENERAL_TASKS = ("general", "hellaswag", "arc_challenge", "arc_easy", "boolq", "mmlu", "piqa", "winogrande",
                 "openbookqa", "commonsense_qa", "sciq", "lambada_openai", "truthfulqa_mc1", "truthfulqa_mc2")
LMEVAL_PREFIX = "lmeval:"


def get_task(name: str, **options) -> Task:
    """Build a task by name, from a user's JSONL/JSON/CSV/Parquet file, or from an lm-evaluation-harness task
    (`lmeval:NAME`); options that are None keep the task's defaults."""
    given = {k: v for k, v in options.items() if v is not None}
    if name.startswith(LMEVAL_PREFIX):
        from caploc.tasks.lmeval import lmeval_task

        return lmeval_task(name[len(LMEVAL_PREFIX):], **given)
    if name not in TASKS and file_format(Path(name)):
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


__all__ = ["Item", "Task", "TargetTask", "MultipleChoiceTask", "GenerationTask", "LoglikelihoodTask", "TASKS",
           "GENERAL_TASKS", "get_task", "Arithmetic", "GSM8K", "HumanEval", "MBPP", "Swear", "Rhyme", "HellaSwag",
           "ARCChallenge", "ARCEasy", "BoolQ", "MMLU", "PIQA", "WinoGrande", "OpenBookQA", "CommonsenseQA", "SciQ",
           "LambadaOpenAI", "TruthfulQAMC1", "TruthfulQAMC2", "WMDPBio", "WMDPChem", "WMDPCyber", "General",
           "UserChoiceTask", "UserTargetTask", "Induction", "IOI", "TextPerplexity"]
