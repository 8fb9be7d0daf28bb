"""Tasks: each module registers its tasks (`@register_task()`) when imported here; `get_task` builds one by
name, from a user's own file, or from an lm-evaluation-harness task (`lmeval:NAME`)."""

from __future__ import annotations

from pathlib import Path

from caploc.errors import CaplocError, ParameterError
from caploc.records import file_format
from caploc.tasks.arithmetic import Arithmetic
from caploc.tasks.base import (OWN_METRIC, REFERENCE_METRIC, TASKS, GenerationTask, Item, LoglikelihoodTask,
                               MultipleChoiceTask, OwnReferenceTask, ReferenceTask, TargetTask, Task, register_task)
from caploc.tasks.benchmarks import PIQA, ARCChallenge, ARCEasy, BoolQ, CommonsenseQA, HellaSwag, OpenBookQA, SciQ, WinoGrande
from caploc.tasks.knowledge import MMLU, LambadaOpenAI, TruthfulQAMC1, TruthfulQAMC2, WMDPBio, WMDPChem, WMDPCyber
from caploc.tasks.code import MBPP, CodeTask, HumanEval
from caploc.tasks.gsm8k import GSM8K
from caploc.tasks.induction import Induction
from caploc.tasks.ioi import IOI
from caploc.tasks.multiple_choice import General, UserChoiceTask
from caploc.tasks.rhyme import Rhyme
from caploc.tasks.swear import Swear
from caploc.tasks.text import TextPerplexity
from caploc.tasks.user import UserTargetTask, user_task

# general-capability tasks: averaged into the "general" figure of a specificity report
GENERAL_TASKS = ("general", "hellaswag", "arc_challenge", "arc_easy", "boolq", "mmlu", "piqa", "winogrande",
                 "openbookqa", "commonsense_qa", "sciq", "lambada_openai", "truthfulqa_mc1", "truthfulqa_mc2")
LMEVAL_PREFIX = "lmeval:"


def get_task(name: str, **options) -> Task:
    """Build a task by registered name, from a user's JSONL/JSON/CSV/Parquet file, or from an
    lm-evaluation-harness task (`lmeval:NAME`); options that are None keep the task's defaults."""
    given = {k: v for k, v in options.items() if v is not None}
    if name.startswith(LMEVAL_PREFIX):
        from caploc.tasks.harness import lmeval_task

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
    accepted = {p.name for p in TASKS[name].params}
    unknown = [k for k in given if k not in accepted]
    if unknown:
        raise ParameterError(f"task {name} does not take option(s): " + ", ".join("{%s}" % u for u in unknown),
                             *unknown)
    return TASKS[name].build(**given)


def runs_code(name: str) -> bool:
    """Whether the task `name` executes model-written code (and so takes `allow_code_execution`)."""
    return name in TASKS and issubclass(TASKS[name].cls, CodeTask)


__all__ = ["REFERENCE_METRIC", "Item", "Task", "TargetTask", "MultipleChoiceTask", "GenerationTask", "LoglikelihoodTask",
           "ReferenceTask", "OWN_METRIC", "OwnReferenceTask", "TASKS", "GENERAL_TASKS", "get_task", "register_task",
           "runs_code", "Arithmetic",
           "GSM8K", "HumanEval", "MBPP", "Swear", "Rhyme", "HellaSwag", "ARCChallenge", "ARCEasy", "BoolQ", "MMLU",
           "PIQA", "WinoGrande", "OpenBookQA", "CommonsenseQA", "SciQ", "LambadaOpenAI", "TruthfulQAMC1",
           "TruthfulQAMC2", "WMDPBio", "WMDPChem", "WMDPCyber", "General", "UserChoiceTask", "UserTargetTask",
           "Induction", "IOI", "TextPerplexity"]
