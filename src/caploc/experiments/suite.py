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
from caploc.experiments.results import CompareResult, LocateResult, SpecificityResult, UniversalResult
from caploc.experiments.specs import EvalOptions, ModelSpec, Runtime, TaskSuite
from caploc.models import DEFAULT_MODEL, LoadedModel
from caploc.stats import score_summary
from caploc.tasks import GENERAL_TASKS, TASKS

UNIVERSAL_THRESHOLD = 0.1  # relative drop of a task's universality metric that counts as degrading it


def specificity(model: ModelSpec | str | LoadedModel | None = None, heads: str | list[str] | None = None,
                suite: TaskSuite | None = None, *, from_run: str | Path | None = None, k: int | None = None,
                evaluation: EvalOptions | None = None, out: str | Path | None = None) -> SpecificityResult:
    """Ablate a head set (given, or the top-k of a `locate` run) on each task of the suite: baseline, ablated
    and paired drop of the task's score with bootstrap intervals (a generation task with references also
    gets the reference's log-probability), and the general-capability average."""
    started = time.perf_counter()
    suite = suite or TaskSuite()
    run = LocateResult.load(from_run) if from_run else None
    if run is None and not heads:
        raise ParameterError("give the heads to ablate ({heads}, e.g. L3H2,L5H1) or a locate run ({from_run})",
                             "heads", "from_run")
    spec = ModelSpec.of(model)
    aliases, run_options = None, None
    if run is not None:
        spec = spec.with_run_defaults(run.model)
        heads = heads or run.top_heads(k)
        source, options = run.task_source(TASKS)
        run_options = {run.task["task"]: options}
        if source != run.task["task"]:
            aliases = {run.task["task"]: source}
    rt = Runtime.open(spec, evaluation)
    head_list = rt.lm.layout.parse_list(heads)
    require(bool(head_list), "no heads to ablate ({heads})", "heads")
    mask = [rt.lm.layout.index(h) for h in head_list]
    rows = {}
    for task in suite.build(run_options, aliases):
        # the run's own task is scored on items it did not identify on (offset = its n)
        offset = run.n if run is not None and task.name == run.task["task"] else 0
        items = task.items(suite.n, suite.seed, offset=offset)
        metrics, fingerprint = {}, None
        for evaluator in rt.evaluators(task, items):
            result = evaluator.evaluate([[], mask])
            metrics |= {m: score_summary(v[0], v[1], suite.seed, m) for m, v in result.scores.items() if m not in metrics}
            fingerprint = fingerprint or evaluator.task_fingerprint
        rows[task.name] = {"task": task.config(), "n": len(items), "offset": offset, "metric": task.default_metric,
                           **metrics[task.default_metric], "metrics": metrics, "task_fingerprint": fingerprint}
    general = [name for name in rows if name in GENERAL_TASKS]
    report = SpecificityResult(
        model=rt.lm.describe(), heads=[str(h) for h in head_list], from_run=str(run.path) if run else None,
        n=suite.n, seed=suite.seed, mode=rt.options.mode, tasks=rows, general=_general_average(rows, general),
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


def universal(model: ModelSpec | str | LoadedModel = DEFAULT_MODEL, suite: TaskSuite | None = None, *,
              candidates: str | list[str] | None = None, threshold: float = UNIVERSAL_THRESHOLD,
              min_tasks: int | None = None, evaluation: EvalOptions | None = None,
              out: str | Path | None = None) -> UniversalResult:
    """Ablate every candidate head alone on every task of the suite (default: arithmetic, general, rhyme on 20
    items); a head is universal when it degrades at least `min_tasks` tasks (default: all but one of >= 3
    tasks, else all) by a relative drop >= `threshold`."""
    started = time.perf_counter()
    suite = suite or TaskSuite("arithmetic,general,rhyme", n=20)
    rt = Runtime.open(model, evaluation)
    layout = rt.lm.layout
    heads = layout.parse_list(candidates) if candidates else layout.all_heads()
    task_objs = suite.build()
    if min_tasks is None:
        min_tasks = len(task_objs) - 1 if len(task_objs) >= 3 else len(task_objs)
    require(1 <= min_tasks <= len(task_objs), f"{{min_tasks}} must be between 1 and {len(task_objs)}", "min_tasks")
    masks = [[]] + [[layout.index(h)] for h in heads]
    per_task = {}
    relative = np.zeros((len(heads), len(task_objs)))
    for t, task in enumerate(task_objs):
        metric = task.universality_metric
        result = rt.evaluator(task, task.items(suite.n, suite.seed)).evaluate(masks)
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
        model=rt.lm.describe(), tasks=[t.config() for t in task_objs], n=suite.n, seed=suite.seed,
        mode=rt.options.mode, threshold=threshold,
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
