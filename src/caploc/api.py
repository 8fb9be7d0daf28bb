"""The Python API: the same operations as the CLI, with the same names and defaults."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from caploc.errors import CaplocError
from caploc.evaluator import Evaluator
from caploc.models import DEFAULT_MODEL, LoadedModel, load_model
from caploc.stats import bootstrap_mean, paired_drop
from caploc.tasks import get_task
from caploc.tasks.base import Task


def resolve_model(model: str | LoadedModel, dtype: str = "float32") -> LoadedModel:
    return model if isinstance(model, LoadedModel) else load_model(model, dtype=dtype)


def resolve_task(task: str | Task, **options) -> Task:
    return task if isinstance(task, Task) else get_task(task, **options)


def task_options(subtask=None, shots=None, data=None, fewshot_data=None, chat=None) -> dict:
    return {"subtask": subtask, "shots": shots, "data": data, "fewshot_data": fewshot_data, "chat": chat}


def score_summary(base_scores: np.ndarray, ablated_scores: np.ndarray | None, seed: int) -> dict:
    mean, lo, hi = bootstrap_mean(base_scores, seed=seed)
    out = {"baseline": mean, "baseline_low": lo, "baseline_high": hi}
    if ablated_scores is not None:
        a_mean, a_lo, a_hi = bootstrap_mean(ablated_scores, seed=seed)
        out |= {"ablated": a_mean, "ablated_low": a_lo, "ablated_high": a_hi}
        out |= paired_drop(base_scores, ablated_scores, seed=seed)
    return out


def evaluate(model: str | LoadedModel = DEFAULT_MODEL, task: str | Task = "arithmetic", n: int = 100, seed: int = 0,
             ablate: str | list[str] | None = None, *, subtask: str | None = None, shots: int | None = None,
             data: str | None = None, fewshot_data: str | None = None, chat: bool | None = None,
             dtype: str = "float32", mode: str = "zero", max_new_tokens: int | None = None,
             progress: bool = False, json_path: str | Path | None = None) -> dict:
    """Baseline and ablated scores of a task, with bootstrap 95% intervals and the paired relative drop."""
    lm = resolve_model(model, dtype)
    task_obj = resolve_task(task, **task_options(subtask, shots, data, fewshot_data, chat))
    heads = lm.layout.parse_list(ablate)
    items = task_obj.items(n, seed)
    evaluator = Evaluator(lm, task_obj, items, mode=mode, progress=progress, max_new_tokens=max_new_tokens)
    try:
        masks = [[]] + ([[lm.layout.index(h) for h in heads]] if heads else [])
        result = evaluator.evaluate(masks)
    finally:
        evaluator.close()
    metrics = {}
    for name, values in result.scores.items():
        metrics[name] = score_summary(values[0], values[1] if heads else None, seed)
    report = {
        "model": lm.describe(), "task": task_obj.config(), "n": len(items), "seed": seed, "mode": mode,
        "ablated_heads": [str(h) for h in heads], "metric": _primary_metric(task_obj), "metrics": metrics,
        "budget": evaluator.stats.as_dict(), "task_fingerprint": evaluator.task_fingerprint,
    }
    if json_path:
        write_json(json_path, report)
    return report


def _primary_metric(task: Task) -> str:
    return task.default_metric


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default))
    tmp.replace(path)  # atomic: a killed run never leaves half a result file


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def heads(model: str | LoadedModel = DEFAULT_MODEL, dtype: str = "float32") -> dict:
    """The model's layers, heads and KV groups."""
    lm = resolve_model(model, dtype)
    layout = lm.layout
    return {"model": lm.describe(),
            "heads": [{"head": str(h), "layer": h.layer, "index": layout.index(h), "kv_group": layout.kv_group(h)}
                      for h in layout.all_heads()]}


def check_positive(name: str, value: int) -> None:
    if value <= 0:
        raise CaplocError(f"{name} must be positive")
