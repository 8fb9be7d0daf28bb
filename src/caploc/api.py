"""The Python API: the same operations as the CLI, with the same names and defaults."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from caploc.errors import CaplocError
from caploc.runs import universal_heads
from caploc.evaluator import Evaluator
from caploc.methods import DEFAULT_MASKS, DEFAULT_METHOD, DEFAULT_SPARSITY, Objective, make_method
from caploc.models import DEFAULT_MODEL, LoadedModel, cache_dir, load_model
from caploc.store import EvalStore
from caploc.stats import bootstrap_mean, paired_drop
from caploc.tasks import get_task
from caploc.tasks.base import Task


def resolve_model(model: str | LoadedModel, dtype: str = "float32") -> LoadedModel:
    return model if isinstance(model, LoadedModel) else load_model(model, dtype=dtype)


def resolve_task(task: str | Task, **options) -> Task:
    return task if isinstance(task, Task) else get_task(task, **options)


def task_options(subtask=None, shots=None, data=None, fewshot_data=None, chat=None,
                 allow_code_execution=None) -> dict:
    return {"subtask": subtask, "shots": shots, "data": data, "fewshot_data": fewshot_data, "chat": chat,
            "allow_code_execution": allow_code_execution}


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
             allow_code_execution: bool | None = None, dtype: str = "float32", mode: str = "zero",
             max_new_tokens: int | None = None, progress: bool = False,
             json_path: str | Path | None = None) -> dict:
    """Baseline and ablated scores of a task, with bootstrap 95% intervals and the paired relative drop."""
    lm = resolve_model(model, dtype)
    task_obj = resolve_task(task, **task_options(subtask, shots, data, fewshot_data, chat, allow_code_execution))
    heads = lm.layout.parse_list(ablate)
    items = task_obj.items(n, seed)
    masks = [[]] + ([[lm.layout.index(h) for h in heads]] if heads else [])
    with Evaluator(lm, task_obj, items, mode=mode, progress=progress, max_new_tokens=max_new_tokens) as evaluator:
        result = evaluator.evaluate(masks)
    metrics = {}
    for name, values in result.scores.items():
        metrics[name] = score_summary(values[0], values[1] if heads else None, seed)
    report = {
        "model": lm.describe(), "task": task_obj.config(), "n": len(items), "seed": seed, "mode": mode,
        "ablated_heads": [str(h) for h in heads], "metric": task_obj.default_metric, "metrics": metrics,
        "budget": evaluator.stats.as_dict(), "task_fingerprint": evaluator.task_fingerprint,
    }
    if json_path:
        write_json(json_path, report)
    return report


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=json_default))
    tmp.replace(path)  # atomic: a killed run never leaves half a result file


def json_default(obj):
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


def identification_metric(task: Task) -> str:
    """Continuous log-probability where the target is known (far less noise per item than 0/1 accuracy),
    the task's own score otherwise."""
    return "logprob" if task.kind in ("target", "choice") else task.default_metric


def open_store(store: str | Path | EvalStore | None) -> EvalStore | None:
    if store is False:
        return None
    if isinstance(store, EvalStore):
        return store
    return EvalStore(store or cache_dir() / "evaluations.sqlite")


def drop_curve(evaluator: Evaluator, ranking: list[int], k: int, seed: int) -> dict:
    """Ablate the top-1, top-2, ..., top-k heads (cumulatively) and measure every metric's paired drop."""
    masks = [ranking[:j] for j in range(0, k + 1)]
    result = evaluator.evaluate(masks)
    curve = {}
    for name, values in result.scores.items():
        curve[name] = [score_summary(values[0], values[j], seed) | {"k": j} for j in range(1, k + 1)]
    return curve


def locate(model: str | LoadedModel = DEFAULT_MODEL, task: str | Task = "arithmetic", method: str = DEFAULT_METHOD,
           k: int = 5, n: int = 100, seed: int = 0, *, n_masks: int = DEFAULT_MASKS, sparsity: float = DEFAULT_SPARSITY, alpha="cv",
           metric: str | None = None, n_validate: int | None = None, subtask: str | None = None,
           shots: int | None = None, data: str | None = None, fewshot_data: str | None = None,
           chat: bool | None = None, allow_code_execution: bool | None = None, dtype: str = "float32",
           mode: str = "zero", max_new_tokens: int | None = None, exclude: str | list[str] | None = None,
           exclude_universal: str | Path | None = None, store: str | Path | EvalStore | None = None,
           out: str | Path | None = None, progress: bool = False) -> dict:
    """Identify the top-k heads of a capability on `n` items, then validate them on `n_validate` held-out items.
    `exclude` heads, and the heads a `universal` result (`exclude_universal`: its file or directory) flags,
    are never reported."""
    check_positive("--k", k)
    started = time.perf_counter()
    lm = resolve_model(model, dtype)
    options = task_options(subtask, shots, data, fewshot_data, chat, allow_code_execution)
    task_obj = resolve_task(task, **options)
    metric = metric or identification_metric(task_obj)
    excluded_names = lm.layout.parse_list(exclude) + lm.layout.parse_list(universal_heads(exclude_universal)
                                                                           if exclude_universal else None)
    excluded = sorted({lm.layout.index(h) for h in excluded_names})
    method_obj = make_method(method, n_masks=n_masks, sparsity=sparsity, alpha=alpha, seed=seed)
    id_items = task_obj.items(n, seed)
    held_out = task_obj.items(n_validate or n, seed, offset=n)
    db = open_store(store)
    common = dict(mode=mode, store=db, progress=progress, max_new_tokens=max_new_tokens)
    identify = Evaluator(lm, task_obj, id_items, **common)
    validate = Evaluator(lm, task_obj, held_out, **common)
    try:
        if metric not in identify.metric_names():
            raise CaplocError(f"task {task_obj.name} has no metric {metric!r}: use {', '.join(identify.metric_names())}")
        objective = Objective(identify, metric)
        result = method_obj.run(objective, k)
        ranking = [i for i in result.ranking if i not in excluded]
        top = ranking[:k]
        identification = drop_curve(identify, ranking, k, seed)
        validation = drop_curve(validate, ranking, k, seed)
    finally:
        identify.close()
        validate.close()
    layout = lm.layout
    per_mask = identify.tokens_per_mask()
    report = {
        "command": "locate",
        "model": lm.describe(),
        "task": task_obj.config(),
        "task_options": {k: v for k, v in options.items() if v is not None and k != "allow_code_execution"},
        "method": {"name": method, **method_obj.params()},
        "k": k, "n": len(id_items), "n_validate": len(held_out), "seed": seed, "mode": mode, "metric": metric,
        "excluded_heads": [str(layout.head(i)) for i in excluded],
        "heads": [{"rank": r + 1, "head": str(layout.head(i)), "index": i, "score": float(result.head_scores[i]),
                   "kv_group": layout.kv_group(layout.head(i))} for r, i in enumerate(top)],
        "score_name": result.score_name,
        "head_scores": [float(x) for x in result.head_scores],
        "ranking": [str(layout.head(i)) for i in ranking],
        "details": result.details,
        "identification": identification,
        "validation": validation,
        "fingerprints": {"model": lm.fingerprint, "identification_items": identify.task_fingerprint,
                         "validation_items": validate.task_fingerprint},
        "budget": {
            "evaluations": objective.requested,
            "computed_evaluations": identify.stats.evaluations + validate.stats.evaluations,
            "reused_evaluations": identify.stats.reused + validate.stats.reused,
            "model_tokens": identify.stats.tokens + validate.stats.tokens,
            "tokens_per_evaluation": per_mask,
            "method_model_tokens": objective.requested * per_mask if per_mask else None,
            "wall_seconds": round(time.perf_counter() - started, 2),
        },
        "store": str(db.path) if db else None,
    }
    if out:
        write_json(Path(out) / "result.json", report)
    return report



# analyses, reports and edits live in their own modules; the API exposes them under the CLI's names
from caploc.analysis import compare, specificity, universal  # noqa: E402
from caploc.cnl import neurons  # noqa: E402
from caploc.cgc import compress, density  # noqa: E402
from caploc.edits import export  # noqa: E402
from caploc.reports import report  # noqa: E402
