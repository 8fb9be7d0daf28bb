"""What a head set does across the task suite: specificity, universal heads, and comparison of two runs.

- specificity: ablate one head set on several tasks; per task the paired drop of its score, plus the
  general-capability average. Specific heads break their task and leave the others standing.
- universal: every single head ablated on every task; heads that degrade most tasks at once are universal
  (often in the first layers), reported with their failure signature, and can be filtered out of `locate`.
- compare: overlap of the head sets (and score rank correlation) of two `locate` runs.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from caploc.errors import ParameterError, require
from caploc.evaluator import Evaluator
from caploc.experiments.context import build_tasks, open_store, parse_task_list, resolve_model
from caploc.experiments.results import CompareResult, LocateResult, SpecificityResult, UniversalResult
from caploc.models import DEFAULT_MODEL, LoadedModel
from caploc.stats import score_summary
from caploc.tasks import GENERAL_TASKS, TASKS

UNIVERSAL_THRESHOLD = 0.1  # relative drop of a task's universality metric that counts as degrading it


def specificity(model: str | LoadedModel | None = None, heads: str | list[str] | None = None,
                tasks: str | list[str] = ("arithmetic", "general"), n: int = 50, seed: int = 0, *,
                from_run: str | Path | None = None, k: int | None = None,
                task_options: dict[str, dict] | None = None, allow_code_execution: bool | None = None,
                dtype: str | None = None, device: str = "auto", workers: int | None = None,
                ray_address: str | None = None, mode: str = "zero", max_new_tokens: int | None = None,
                store=None, out: str | Path | None = None, progress: bool = False) -> SpecificityResult:
    """Ablate a head set (given, or the top-k of a `locate` run) on each task: baseline, ablated and paired
    drop of the task's score with bootstrap intervals, and the general-capability average."""
    started = time.perf_counter()
    run = LocateResult.load(from_run) if from_run else None
    if run is None and not heads:
        raise ParameterError("give the heads to ablate ({heads}, e.g. L3H2,L5H1) or a locate run ({from_run})",
                             "heads", "from_run")
    aliases = None
    if run is not None:
        model = model or run.model["spec"]
        dtype = dtype or run.model.get("dtype")
        heads = heads or run.top_heads(k)
        source, options = run.task_source(TASKS)
        task_options = dict(task_options or {})
        task_options.setdefault(run.task["task"], options)
        if source != run.task["task"]:
            aliases = {run.task["task"]: source}
    lm = resolve_model(model or DEFAULT_MODEL, dtype or "auto", device, workers, ray_address)
    head_list = lm.layout.parse_list(heads)
    require(bool(head_list), "no heads to ablate ({heads})", "heads")
    mask = [lm.layout.index(h) for h in head_list]
    db = open_store(store)
    rows = {}
    for task in build_tasks(parse_task_list(tasks), task_options, allow_code_execution, aliases):
        # the run's own task is scored on items it did not identify on (offset = its n)
        offset = run.n if run is not None and task.name == run.task["task"] else 0
        items = task.items(n, seed, offset=offset)
        with Evaluator(lm, task, items, mode=mode, store=db, progress=progress,
                       max_new_tokens=max_new_tokens) as evaluator:
            result = evaluator.evaluate([[], mask])
        metrics = {m: score_summary(v[0], v[1], seed) for m, v in result.scores.items()}
        rows[task.name] = {"task": task.config(), "n": len(items), "offset": offset, "metric": task.default_metric,
                           **metrics[task.default_metric], "metrics": metrics,
                           "task_fingerprint": evaluator.task_fingerprint}
    general = [name for name in rows if name in GENERAL_TASKS]
    report = SpecificityResult(
        model=lm.describe(), heads=[str(h) for h in head_list], from_run=str(run.path) if run else None, n=n,
        seed=seed, mode=mode, tasks=rows, general=_general_average(rows, general),
        wall_seconds=round(time.perf_counter() - started, 2))
    target = out or (run.path.parent if run is not None else None)
    if target:
        report.save(Path(target) / SpecificityResult.filename)
    return report


def _general_average(rows: dict, names: list[str]) -> dict | None:
    if not names:
        return None
    base = float(np.mean([rows[n]["baseline"] for n in names]))
    ablated = float(np.mean([rows[n]["ablated"] for n in names]))
    return {"tasks": names, "baseline": base, "ablated": ablated,
            "relative_drop": (base - ablated) / abs(base) if base else float("nan"),
            "mean_relative_drop": float(np.mean([rows[n]["relative_drop"] for n in names]))}


def repetition_rate(text: str, n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier n-gram of the same text (degenerate loops -> 1)."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def universal(model: str | LoadedModel = DEFAULT_MODEL, tasks: str | list[str] = ("arithmetic", "general", "rhyme"),
              n: int = 20, seed: int = 0, *, candidates: str | list[str] | None = None,
              threshold: float = UNIVERSAL_THRESHOLD, min_tasks: int | None = None,
              task_options: dict[str, dict] | None = None, allow_code_execution: bool | None = None,
              dtype: str = "auto", device: str = "auto", workers: int | None = None, ray_address: str | None = None,
              mode: str = "zero", max_new_tokens: int | None = None, store=None,
              out: str | Path | None = None, progress: bool = False) -> UniversalResult:
    """Ablate every candidate head alone on every task; a head is universal when it degrades at least
    `min_tasks` tasks (default: all but one of >= 3 tasks, else all) by a relative drop >= `threshold`."""
    started = time.perf_counter()
    lm = resolve_model(model, dtype, device, workers, ray_address)
    layout = lm.layout
    heads = layout.parse_list(candidates) if candidates else layout.all_heads()
    task_objs = build_tasks(parse_task_list(tasks), task_options, allow_code_execution)
    if min_tasks is None:
        min_tasks = len(task_objs) - 1 if len(task_objs) >= 3 else len(task_objs)
    require(1 <= min_tasks <= len(task_objs), f"{{min_tasks}} must be between 1 and {len(task_objs)}", "min_tasks")
    db = open_store(store)
    masks = [[]] + [[layout.index(h)] for h in heads]
    per_task = {}
    relative = np.zeros((len(heads), len(task_objs)))
    for t, task in enumerate(task_objs):
        metric = task.universality_metric
        with Evaluator(lm, task, task.items(n, seed), mode=mode, store=db, progress=progress,
                       max_new_tokens=max_new_tokens) as evaluator:
            result = evaluator.evaluate(masks)
        means = result.scores[metric].mean(axis=1)
        base = means[0]
        relative[:, t] = (base - means[1:]) / abs(base) if base else 0.0
        signature = {"metric": metric, "baseline": float(base), "ablated": means[1:].tolist()}
        if result.texts is not None:  # generation: degenerate output shows as repetition
            rates = [float(np.mean([repetition_rate(x) for x in texts])) for texts in result.texts]
            signature |= {"repetition_baseline": rates[0], "repetition": rates[1:]}
        per_task[task.name] = signature
    degraded = relative >= threshold
    rows = []
    for h, head in enumerate(heads):
        row = {"head": str(head), "index": layout.index(head), "tasks_degraded": int(degraded[h].sum()),
               "mean_relative_drop": float(relative[h].mean()),
               "relative_drop": {task.name: float(relative[h, t]) for t, task in enumerate(task_objs)},
               "universal": bool(degraded[h].sum() >= min_tasks)}
        row["signature"] = {task.name: _signature(per_task[task.name], h) for task in task_objs}
        rows.append(row)
    rows.sort(key=lambda r: (-r["tasks_degraded"], -r["mean_relative_drop"]))
    report = UniversalResult(
        model=lm.describe(), tasks=[t.config() for t in task_objs], n=n, seed=seed, mode=mode, threshold=threshold,
        min_tasks=min_tasks, metrics={name: s["metric"] for name, s in per_task.items()},
        baselines={name: s["baseline"] for name, s in per_task.items()},
        universal_heads=[r["head"] for r in rows if r["universal"]], heads=rows,
        wall_seconds=round(time.perf_counter() - started, 2))
    if out:
        report.save(Path(out) / UniversalResult.filename)
    return report


def _signature(task_signature: dict, h: int) -> dict:
    out = {"metric": task_signature["metric"], "baseline": task_signature["baseline"],
           "ablated": task_signature["ablated"][h]}
    if "repetition" in task_signature:
        out |= {"repetition_baseline": task_signature["repetition_baseline"],
                "repetition": task_signature["repetition"][h]}
    return out


def compare(run_a: str | Path, run_b: str | Path, k: int | None = None) -> CompareResult:
    """Overlap of the top-k heads of two locate runs (e.g. identified on arithmetic vs on gsm8k), and the
    Spearman correlation of their per-head scores when both ran on the same model."""
    a, b = LocateResult.load(run_a), LocateResult.load(run_b)
    top_a, top_b = a.top_heads(k), b.top_heads(k)
    shared = [h for h in top_a if h in top_b]
    union = set(top_a) | set(top_b)
    report = CompareResult(runs=[str(a.path), str(b.path)], tasks=[a.task.get("task"), b.task.get("task")],
                           k=[len(top_a), len(top_b)], heads=[top_a, top_b], shared=shared, overlap=len(shared),
                           jaccard=len(shared) / len(union) if union else math.nan, spearman=None)
    if a.model.get("fingerprint") != b.model.get("fingerprint"):
        report.note = "the runs used different models (or precisions): head scores are not compared"
    elif a.head_scores and b.head_scores and len(a.head_scores) == len(b.head_scores):
        from scipy.stats import spearmanr

        # only heads both runs measured: refine and bounded greedy rounds leave the others NaN
        scores = np.array([a.head_scores, b.head_scores], dtype=np.float64)
        both = np.isfinite(scores).all(axis=0)
        report.spearman_heads = int(both.sum())
        if both.sum() >= 3:
            report.spearman = float(spearmanr(scores[0, both], scores[1, both]).statistic)
    return report
