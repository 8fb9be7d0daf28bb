"""`caploc eval` and `caploc heads`: a task's scores at baseline and with heads ablated; the model's heads."""

from __future__ import annotations

from pathlib import Path

from caploc.errors import ParameterError
from caploc.experiments.results import EvaluateResult, HeadsResult
from caploc.experiments.specs import EvalOptions, ModelSpec, Runtime, TaskSpec
from caploc.models import DEFAULT_MODEL, LoadedModel
from caploc.stats import low_baseline_warning, score_summary
from caploc.tasks import TASKS
from caploc.tasks.base import Task


def evaluate(model: ModelSpec | str | LoadedModel = DEFAULT_MODEL, task: TaskSpec | str | Task = "arithmetic",
             ablate: str | list[str] | None = None, *, evaluation: EvalOptions | None = None,
             json_path: str | Path | None = None) -> EvaluateResult:
    """Baseline and ablated scores of every metric of a task (a generation task with references: the real
    metric by generation and the reference's log-probability), with bootstrap 95% intervals and the paired
    relative drop."""
    rt = Runtime.open(model, evaluation, store=False)
    spec = TaskSpec.of(task)
    task_obj = spec.build()
    heads = rt.lm.layout.parse_list(ablate)
    masks = [[]] + ([[rt.lm.layout.index(h) for h in heads]] if heads else [])
    metrics, budget, fingerprint = {}, {}, None
    for evaluator in rt.evaluators(task_obj, task_obj.items(spec.n, spec.seed)):
        scores = evaluator.evaluate(masks).scores
        metrics |= {name: score_summary(values[0], values[1] if heads else None, spec.seed, name)
                    for name, values in scores.items() if name not in metrics}
        budget = {k: budget.get(k, 0) + v for k, v in evaluator.stats.as_dict().items()}
        fingerprint = fingerprint or evaluator.task_fingerprint
    result = EvaluateResult(
        model=rt.lm.describe(), task=task_obj.config(), n=len(evaluator.items), seed=spec.seed,
        mode=evaluator.mode, ablated_heads=[str(h) for h in heads], metric=task_obj.default_metric,
        metrics=metrics, budget=budget, task_fingerprint=fingerprint)
    if "acc" in metrics:
        note = low_baseline_warning(task_obj.name, metrics["acc"]["baseline"], task_obj.identification_metric)
        result.warnings += [note] if note else []
    if json_path:
        result.save(json_path)
    return result


def heads(model: ModelSpec | str | LoadedModel = DEFAULT_MODEL, *, scores: str | None = None,
          seed: int = 0) -> HeadsResult:
    """The model's layers, heads and KV groups; with `scores=TASK` also each head's attention signatures for
    a task that has them (`Task.head_scores`: induction's prefix-matching and previous-token attention,
    IOI's attention from the last token to the indirect object and to the subject)."""
    with_scores = [name for name, entry in TASKS.items() if entry.cls.attention_check is not None]
    if scores is not None and scores not in with_scores:
        raise ParameterError(f"unknown {{scores}} {scores!r}: choose {', '.join(with_scores)}", "scores")
    rt = Runtime.open(model, store=False)
    layout = rt.lm.layout
    rows = [{"head": str(h), "layer": h.layer, "index": layout.index(h), "kv_group": layout.kv_group(h)}
            for h in layout.all_heads()]
    if scores:
        for name, values in TASKS[scores].cls.head_scores(rt.lm, seed=seed).items():
            for row, value in zip(rows, values.reshape(-1)):
                row[name] = float(value)
    return HeadsResult(model=rt.lm.describe(), heads=rows)
