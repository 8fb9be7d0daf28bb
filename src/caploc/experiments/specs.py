"""What every experiment takes, passed whole: the model (`ModelSpec`), the task (`TaskSpec`, or a `TaskSuite` of
several), and how evaluations run (`EvalOptions`). Each resolves once, at the start of an experiment, into what
the layers below use: a `Runtime` (the loaded model, the backend its evaluations run on, the open store) and a
built `Task`.

A spec field's `cli` metadata is its command-line flag and help text: the commands are generated from these
classes, so a field added here is a flag there.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from caploc.errors import ParameterError, check_positive
from caploc.evaluator import Evaluator
from caploc.evaluator.backend import IN_PROCESS, Backend
from caploc.files import cache_dir
from caploc.models import DEFAULT_MODEL, LoadedModel, load_model
from caploc.store import EvalStore
from caploc.tasks import TASKS, get_task, runs_code
from caploc.tasks.base import Item, Task


def cli(*flags: str, help: str = "", parse=None, hidden: bool = False) -> dict:
    """Field metadata: the flag(s) that set the field on the command line, its help, and how to parse the
    text (default: as the field's type)."""
    return {"cli": {"flags": flags, "help": help, "parse": parse, "hidden": hidden}}


def parse_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(float(x)) for x in text.split(",") if x.strip())
    except ValueError:
        raise ParameterError(f"{{seeds}}: not a comma-separated list of integers: {text!r}", "seeds") from None


# -- the model --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """The model to run and where: a name, an HF id, a local directory or a GGUF file (or a model already
    loaded), its precision and device, and optionally Ray workers to shard its evaluations over."""

    model: str | LoadedModel | None = field(default=None, metadata=cli(
        "--model", "-m", help=f"{DEFAULT_MODEL} (default), gemma3-270m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b, an HF "
                              "hub id, a local model dir, or a .gguf file"))
    dtype: str = field(default="auto", metadata=cli(
        "--dtype", help="auto (bfloat16 where the hardware runs it natively - CUDA, CPUs with AVX512-BF16 or "
                        "AMX - else float32), float32 (exact) or bfloat16"))
    device: str = field(default="auto", metadata=cli(
        "--device", help="auto (CUDA when available, else MPS, else CPU), cpu, cuda, cuda:N or mps"))
    workers: int | None = field(default=None, metadata=cli(
        "--workers", help="shard evaluations over N Ray actors, one model replica each (a local Ray instance; one "
                          "GPU per actor on CUDA, else the CPU cores split between them); needs caploc[ray]"))
    ray_address: str | None = field(default=None, metadata=cli(
        "--ray-address", help="join an existing Ray cluster (ADDR, or auto) instead of starting a local one"))

    @classmethod
    def of(cls, model: "ModelSpec | str | LoadedModel | None") -> "ModelSpec":
        return model if isinstance(model, ModelSpec) else cls(model=model)

    def with_run_defaults(self, run_model: dict) -> "ModelSpec":
        """A run's model and precision where this spec leaves them open (no model given, dtype auto)."""
        dtype = run_model.get("dtype") or self.dtype if self.dtype == "auto" else self.dtype
        return replace(self, model=self.model or run_model["spec"], dtype=dtype)

    def resolve(self) -> tuple[LoadedModel, Backend]:
        """The loaded model and the backend its evaluations run on (in this process, or Ray actors)."""
        lm = (self.model if isinstance(self.model, LoadedModel)
              else load_model(self.model or DEFAULT_MODEL, self.dtype, self.device))
        if not (self.workers or self.ray_address):
            return lm, IN_PROCESS
        from caploc.evaluator.distributed import ray_backend

        return lm, ray_backend(lm, self.workers, self.ray_address)


# -- how evaluations run ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalOptions:
    """How evaluations run: the ablation mode, the generation length limit, the store and progress bars."""

    mode: str = field(default="zero", metadata=cli(
        "--mode", help="ablation: zero (default) or mean (mean over the task's prompts)"))
    max_new_tokens: int | None = field(default=None, metadata=cli("--max-new-tokens", help="generation length limit"))
    store: str | Path | EvalStore | bool | None = field(default=None, metadata=cli(
        "--store", help="evaluation store (default: $CAPLOC_CACHE/evaluations.sqlite)"))
    progress: bool = False  # the command line shows bars unless --quiet or --json


def open_store(store: str | Path | EvalStore | None | bool) -> EvalStore | None:
    """The evaluation store: given, or $CAPLOC_CACHE/evaluations.sqlite; False for none."""
    if store is False:
        return None
    if isinstance(store, EvalStore):
        return store
    return EvalStore(store or cache_dir() / "evaluations.sqlite")


@dataclass
class Runtime:
    """A resolved model with the backend and store its evaluations use: what builds every evaluator."""

    lm: LoadedModel
    backend: Backend
    store: EvalStore | None
    options: EvalOptions

    @classmethod
    def open(cls, model: "ModelSpec | str | LoadedModel | None", evaluation: EvalOptions | None = None,
             store: bool = True) -> "Runtime":
        """Load the model, start its backend, open the store (`store=False`: none, for commands that do not
        evaluate)."""
        options = evaluation or EvalOptions()
        lm, backend = ModelSpec.of(model).resolve()
        return cls(lm, backend, open_store(options.store) if store else None, options)

    def evaluator(self, task: Task, items: list[Item], **kwargs) -> Evaluator:
        kwargs = {"mode": self.options.mode, "max_new_tokens": self.options.max_new_tokens, "store": self.store,
                  "progress": self.options.progress, "backend": self.backend} | kwargs
        return Evaluator(self.lm, task, items, **kwargs)

    def evaluators(self, task: Task, items: list[Item], **kwargs) -> list[Evaluator]:
        """One evaluator per scoring of the task (a generation task with references: the generations and
        the reference's log-probability), on the same items."""
        return [self.evaluator(t, t.from_source(items), **kwargs) for t in task.scorings()]


# -- the task -------------------------------------------------------------------------------------------
def _task_help() -> str:
    return ("task name (" + ", ".join(TASKS) + "), lmeval:NAME for any lm-evaluation-harness task, or your own "
            "JSONL/CSV file (`caploc tasks` lists them)")


def parse_assignments(values, what: str, form: str = "NAME=VALUE") -> dict[str, str]:
    """Repeatable NAME=VALUE options -> {name: value}."""
    if isinstance(values, dict):
        return dict(values)
    out = {}
    for value in values or ():
        name, sep, setting = str(value).partition("=")
        if not sep or not name.strip() or not setting.strip():
            raise ParameterError(f"{{{what}}} takes {form}, got {value!r}", what)
        out[name.strip()] = setting.strip()
    return out


@dataclass(frozen=True)
class TaskSpec:
    """A task and its items: which task (a name, a file, lmeval:NAME, or a Task), its options, how many
    items to identify on (`n`) and validate on (`n_validate`, default n; held out: the next items in the
    seeded order), and the seed of every random choice."""

    task: str | Task = field(default="arithmetic", metadata=cli("--task", "-t", help=_task_help))
    subtask: str | None = field(default=None, metadata=cli(
        "--subtask", help="sub-task(s): arithmetic 2D+,3D- (default all 10); mmlu subjects; rhyme easy|hard; "
                          "general categories"))
    shots: int | None = field(default=None, metadata=cli("--shots", help="few-shot exemplars (task default when "
                                                                          "omitted)"))
    data: str | None = field(default=None, metadata=cli("--data", help="dataset: local JSONL/Parquet in the "
                                                                        "dataset's own schema, or an HF id"))
    fewshot_data: str | None = field(default=None, metadata=cli("--fewshot-data", help="separate file/split for "
                                                                                        "few-shot exemplars"))
    chat: bool | None = field(default=None, metadata=cli("--chat/--no-chat", help="wrap prompts in the model's "
                                                                                  "chat template"))
    allow_code_execution: bool | None = field(default=None, metadata=cli(
        "--allow-code-execution/--no-code-execution", help="let humaneval/mbpp run model-written code (sandboxed "
                                                           "child process); or set CAPLOC_ALLOW_CODE_EXECUTION=1"))
    options: tuple[str, ...] | dict = field(default=(), metadata=cli(
        "--task-arg", help="NAME=VALUE: any other parameter of the task's (`caploc tasks` lists them); repeatable"))
    n: int = field(default=100, metadata=cli("--n", help="number of items (deterministic given --seed)"))
    n_validate: int | None = field(default=None, metadata=cli("--n-validate", help="held-out items (default: "
                                                                                    "--n)"))
    seed: int = field(default=0, metadata=cli("--seed", help="seed for item selection and every random choice"))

    def __post_init__(self):
        check_positive("n", self.n)
        if self.n_validate is not None:
            check_positive("n_validate", self.n_validate)

    @classmethod
    def of(cls, task: "TaskSpec | str | Task") -> "TaskSpec":
        return task if isinstance(task, TaskSpec) else cls(task=task)

    def given(self) -> dict:
        """The task options set (None keeps the task's default), `--task-arg`s typed by its declaration."""
        named = {f: getattr(self, f) for f in ("subtask", "shots", "data", "fewshot_data", "chat",
                                               "allow_code_execution") if getattr(self, f) is not None}
        extra = parse_assignments(self.options, "options")
        if extra and isinstance(self.task, str) and self.task in TASKS:
            from caploc.params import coerce

            declared = {p.name: p for p in TASKS[self.task].params}
            extra = {k: coerce(v, declared[k].annotation, k) if k in declared else v for k, v in extra.items()}
        return named | extra

    def recorded(self) -> dict:
        """What a result records to rebuild the task (permission to run code is not replayed)."""
        return {k: v for k, v in self.given().items() if k != "allow_code_execution"}

    def build(self) -> Task:
        return self.task if isinstance(self.task, Task) else get_task(self.task, **self.given())

    def replace(self, **changes) -> "TaskSpec":
        return TaskSpec(**({f.name: getattr(self, f.name) for f in fields(self)} | changes))


@dataclass(frozen=True)
class TaskSuite:
    """Several tasks on the same number of items and seed: `tasks` comma-separated (names, files, lmeval:NAME,
    or Task objects; `task:subtask` picks a sub-task), with per-task data and sub-tasks as TASK=VALUE."""

    tasks: str | list = field(default="arithmetic,general", metadata=cli(
        "--tasks", help="comma-separated tasks (names or JSONL files)"))
    n: int = field(default=50, metadata=cli("--n", help="items per task"))
    seed: int = field(default=0, metadata=cli("--seed", help="seed for item selection and every random choice"))
    data: tuple[str, ...] | dict = field(default=(), metadata=cli(
        "--data", help="TASK=PATH: a task's dataset (file or HF id); repeatable"))
    subtask: tuple[str, ...] | dict = field(default=(), metadata=cli(
        "--subtask", help="TASK=VALUE: a task's sub-task(s); repeatable"))
    allow_code_execution: bool | None = field(default=None, metadata=cli(
        "--allow-code-execution/--no-code-execution", help="let humaneval/mbpp run model-written code (sandboxed "
                                                           "child process); or set CAPLOC_ALLOW_CODE_EXECUTION=1"))

    def __post_init__(self):
        check_positive("n", self.n)

    def names(self) -> list:
        return parse_task_list(self.tasks)

    def options(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for key in ("data", "subtask"):
            form = f"TASK=VALUE (e.g. {{{key}}} mmlu=mmlu_test.jsonl)" if key == "data" else "TASK=VALUE"
            for name, value in parse_assignments(getattr(self, key), key, form).items():
                out.setdefault(name, {})[key] = value
        return out

    def build(self, extra_options: dict[str, dict] | None = None, aliases: dict[str, str] | None = None) -> list[Task]:
        options = self.options()
        for name, opts in (extra_options or {}).items():
            options[name] = opts | options.get(name, {})
        return build_tasks(self.names(), options, self.allow_code_execution, aliases)


def parse_task_list(tasks) -> list:
    """Task names from "a,b" or a sequence (Task objects kept); at least one."""
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks or ())
    names = [t.strip() if isinstance(t, str) else t for t in items]
    names = [t for t in names if not isinstance(t, str) or t]
    if not names:
        raise ParameterError("{tasks} needs at least one task", "tasks")
    return names


def build_tasks(names: list[str | Task], task_options: dict[str, dict] | None,
                allow_code_execution: bool | None, aliases: dict[str, str] | None = None) -> list[Task]:
    """Tasks by name (or already built); `aliases` maps a name to what builds it (a user task's file).
    "general:reading" is a task with a sub-task."""
    tasks = []
    for name in names:
        if isinstance(name, Task):
            tasks.append(name)
            continue
        options = dict((task_options or {}).get(name, {}))
        if ":" in name and name.split(":", 1)[0] in TASKS:
            name, options["subtask"] = name.split(":", 1)
        name = (aliases or {}).get(name, name)
        if allow_code_execution is not None and runs_code(name):
            options.setdefault("allow_code_execution", allow_code_execution)
        task = get_task(name, **options)
        if options.get("subtask") and f"{name}:{options['subtask']}" in names:
            task.name = f"{name}:{options['subtask']}"  # keep variants of one task apart in the report
        tasks.append(task)
    return tasks

