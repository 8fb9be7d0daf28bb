"""Typed results of every command, each with a `schema_version`.

A result is a dataclass; `to_dict()` is its JSON form (`save()` writes it atomically, `load()` reads it
back and checks it). Results also read as mappings of that JSON form (`result["heads"]`), as
transformers' ModelOutput does, so code written against caploc 0.1's plain dicts keeps working.

Schema versions: 1 = caploc 0.1 (no `schema_version` field; `load()` upgrades it: a locate run without
`task_options` gets them from its task config), 2 = caploc 0.2, 3 = this version: the `relative_drop` of a
log-probability metric is the share of the answer's probability removed, 1 - exp(-drop) (`stats.share_removed`;
older files are upgraded from their `drop`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from caploc.errors import CaplocError
from caploc.files import read_json, write_json
from caploc.stats import LOG_PROBABILITIES

SCHEMA_VERSION = 3


def _reshare(summary, metric: str) -> None:
    """A summary (or a curve of them) written before schema 3: a log-probability's relative drop as the share
    of probability removed."""
    for point in summary if isinstance(summary, list) else [summary]:
        if metric in LOG_PROBABILITIES and isinstance(point, dict) and "drop" in point:
            point["relative_drop"] = -math.expm1(-point["drop"])


def _reshare_all(by_metric: dict | None) -> None:
    for metric, summary in (by_metric or {}).items():
        _reshare(summary, metric)


def _optional():
    """A field that is left out of the JSON form when it is None (as 0.1 left the key out)."""
    return field(default=None, metadata={"optional": True})


@dataclass
class Result(Mapping):
    command: ClassVar[str] = ""
    filename: ClassVar[str | None] = None  # the file a run directory keeps it in
    required: ClassVar[tuple[str, ...]] = ()  # keys without which a file is not this result

    def __post_init__(self):
        self.path: Path | None = None  # where it was loaded from or saved to (not part of the result)

    # -- JSON form -------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "command": self.command}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "extra":
                out |= value
            elif not (f.metadata.get("optional") and value is None):
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict, source: str = "result") -> "Result":
        data = dict(data)
        version = data.pop("schema_version", 1)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise CaplocError(f"{source} has schema_version {version!r}; this caploc reads up to "
                              f"{SCHEMA_VERSION}: upgrade caploc")
        command = data.pop("command", cls.command)
        if command != cls.command:
            raise CaplocError(f"{source} is a {command} result, not a caploc {cls.command} result")
        cls.upgrade(data, version)
        missing = [k for k in cls.required if k not in data]
        if missing:
            raise CaplocError(f"{source} is not a caploc {cls.command} result (no {missing[0]!r})")
        fields = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in data.items() if k in fields - {"extra"}}
        extra = {k: v for k, v in data.items() if k not in fields}
        try:
            result = cls(**known, **({"extra": extra} if "extra" in fields else {}))
        except TypeError as exc:  # a required field is absent
            raise CaplocError(f"{source} is not a complete caploc {cls.command} result: {exc}") from None
        return result

    @classmethod
    def upgrade(cls, data: dict, version: int) -> None:
        """Bring an older file's keys up to this schema in place."""

    def save(self, target: str | Path) -> Path:
        """Write to `target`: a file, or a run directory (then its `filename` inside it)."""
        path = Path(target)
        if self.filename and (path.is_dir() or not path.suffix):
            path = path / self.filename
        self.path = write_json(path, self.to_dict())
        return self.path

    @classmethod
    def load(cls, target: str | Path) -> "Result":
        """Read from a file, or from a run directory's `filename`."""
        path = Path(target)
        if path.is_dir() and cls.filename:
            path = path / cls.filename
        elif not path.exists():
            raise CaplocError(f"run directory not found: {target}")
        result = cls.from_dict(read_json(path, f"{cls.command} result"), str(path))
        result.path = path
        return result

    # -- mapping view of the JSON form ----------------------------------------------------------------
    def __getitem__(self, key: str):
        return self.to_dict()[key]

    def __iter__(self):
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


@dataclass
class HeadsResult(Result):
    command: ClassVar[str] = "heads"
    model: dict
    heads: list[dict]


@dataclass
class EvaluateResult(Result):
    command: ClassVar[str] = "eval"
    model: dict
    task: dict
    n: int
    seed: int
    mode: str
    ablated_heads: list[str]
    metric: str
    metrics: dict  # metric -> score summary (baseline, ablated, paired drop with intervals)
    budget: dict
    task_fingerprint: str
    warnings: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @classmethod
    def upgrade(cls, data: dict, version: int) -> None:
        if version < 3:
            _reshare_all(data.get("metrics"))


@dataclass
class LocateResult(Result):
    command: ClassVar[str] = "locate"
    filename: ClassVar[str] = "result.json"
    required: ClassVar[tuple[str, ...]] = ("heads", "ranking", "model")
    model: dict
    task: dict
    method: dict
    k: int
    n: int
    n_validate: int
    seed: int
    metric: str
    heads: list[dict]  # top-k: rank, head, index, score, kv_group
    score_name: str
    head_scores: list[float]  # one per head, larger = more important (for heatmaps)
    ranking: list[str]  # every head, most important first
    identification: dict  # metric -> drop curve on the identification items
    validation: dict  # metric -> drop curve on held-out items
    task_options: dict = field(default_factory=dict)  # what rebuilds the task
    control: dict = field(default_factory=dict)  # control tasks, their metrics, the penalty and criterion
    head_effects: dict = field(default_factory=dict)  # per head: estimated target and control drops
    control_validation: dict = field(default_factory=dict)  # control task -> metric -> held-out drop curve
    # non-ablation evidence: the reported heads among the highest by an attention signature (induction, ioi)
    attention_check: dict = field(default_factory=dict)
    stability: dict = field(default_factory=dict)  # bootstrap selection frequency; per-seed top-k
    warnings: list[str] = field(default_factory=list)
    mode: str = "zero"
    excluded_heads: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)
    fingerprints: dict = field(default_factory=dict)
    budget: dict = field(default_factory=dict)
    store: str | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def upgrade(cls, data: dict, version: int) -> None:
        if version < 3:
            for curves in (data.get("identification"), data.get("validation"),
                           *(data.get("control_validation") or {}).values()):
                _reshare_all(curves)
        if "task_options" not in data:  # 0.1 runs before task_options recorded only the task's config
            config = data.get("task", {})
            options = {k: config[k] for k in ("shots", "data", "chat") if config.get(k) is not None}
            if config.get("subtasks"):
                options["subtask"] = ",".join(config["subtasks"])
            data["task_options"] = options

    def top_heads(self, k: int | None = None) -> list[str]:
        """The run's top-k heads (its own k when k is None)."""
        return list(self.ranking[:(k or self.k or len(self.heads))])

    def task_source(self, builtin_tasks) -> tuple[str, dict]:
        """(what builds the run's task again, its options): a user's own task file is rebuilt from its path."""
        config = self.task
        options = dict(self.task_options)
        if config.get("task") not in builtin_tasks and config.get("data"):
            options.pop("data", None)
            return config["data"], options
        return config["task"], options


@dataclass
class SpecificityResult(Result):
    command: ClassVar[str] = "specificity"
    filename: ClassVar[str] = "specificity.json"
    required: ClassVar[tuple[str, ...]] = ("tasks", "heads")
    model: dict
    heads: list[str]
    n: int
    seed: int
    tasks: dict  # task name -> its metric's summary, plus every metric's
    general: dict | None = None  # the general-capability average
    from_run: str | None = None
    mode: str = "zero"
    wall_seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @classmethod
    def upgrade(cls, data: dict, version: int) -> None:
        if version < 3:
            for row in (data.get("tasks") or {}).values():
                _reshare(row, row.get("metric"))
                _reshare_all(row.get("metrics"))


@dataclass
class UniversalResult(Result):
    command: ClassVar[str] = "universal"
    filename: ClassVar[str] = "universal.json"
    required: ClassVar[tuple[str, ...]] = ("heads",)
    model: dict
    tasks: list[dict]
    n: int
    seed: int
    threshold: float
    min_tasks: int
    metrics: dict
    baselines: dict
    universal_heads: list[str]
    heads: list[dict]
    mode: str = "zero"
    wall_seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @classmethod
    def upgrade(cls, data: dict, version: int) -> None:
        if "universal_heads" not in data and "heads" in data:
            data["universal_heads"] = [h["head"] for h in data["heads"] if h.get("universal")]


@dataclass
class CompareResult(Result):
    command: ClassVar[str] = "compare"
    runs: list[str]
    tasks: list[str]
    k: list[int]
    heads: list[list[str]]
    shared: list[str]
    overlap: int
    jaccard: float = math.nan
    spearman: float | None = None
    spearman_heads: int | None = _optional()  # heads both runs scored (methods leave unmeasured heads NaN)
    note: str | None = _optional()


@dataclass
class NeuronsResult(Result):
    command: ClassVar[str] = "neurons"
    filename: ClassVar[str] = "neurons.json"
    model: dict
    task: dict
    n: int
    seed: int
    attribution: dict
    rule: dict
    neurons: list[str]
    neurons_split_b: list[str]
    per_layer: list[int]
    overlap: dict
    random_neurons: list[str]
    ablation: dict
    enhancement: list[dict]
    fingerprints: dict
    wall_seconds: float = 0.0

    @classmethod
    def upgrade(cls, data: dict, version: int) -> None:
        if version < 3:
            for entry in (data.get("ablation") or {}).values():
                _reshare(entry.get("located"), entry.get("metric"))
                _reshare(entry.get("random"), entry.get("metric"))
            for e in data.get("enhancement") or []:
                _reshare_all(e.get("metrics"))
                _reshare_all(e.get("random_metrics"))


@dataclass
class DensityResult(Result):
    command: ClassVar[str] = "density"
    filename: ClassVar[str] = "density.json"
    model: dict
    params: dict
    training: dict
    heads: list[str]
    breadth: list[float]
    entropy: list[float]
    consistency: list[float]
    density: list[float]
    wanda: list[float]
    text: str
    spearman_density_wanda: float
    from_run: str | None = _optional()
    spearman_density_head_scores: float | None = _optional()
    wall_seconds: float = 0.0


@dataclass
class CompressResult(Result):
    command: ClassVar[str] = "compress"
    filename: ClassVar[str] = "compress.json"
    model: dict
    target: float
    n: int
    seed: int
    perplexity_text: dict
    rows: list[dict]
    spearman_density_wanda: float
    wall_seconds: float = 0.0


@dataclass
class ExportResult(Result):
    command: ClassVar[str] = "export"
    out: str
    removed_heads: list[str]
    model: dict


@dataclass
class ReportResult(Result):
    command: ClassVar[str] = "report"
    html: str
    figures: dict
    specificity: bool
    universal_heads: list[str]


@dataclass
class DoctorResult(Result):
    command: ClassVar[str] = "doctor"
    running_as: str
    drops_to: str
    mechanisms: dict  # bwrap / namespaces -> which layers a probe inside it saw
    in_use: str | None
    refusal: str | None = _optional()


RESULT_TYPES = {cls.command: cls for cls in (HeadsResult, EvaluateResult, LocateResult, SpecificityResult,
                                             UniversalResult, CompareResult, NeuronsResult, DensityResult,
                                             CompressResult, ExportResult, ReportResult, DoctorResult)}
