"""`caploc locate`: identify the top-k heads of a capability on some items, validate them on held-out items."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from caploc.errors import ParameterError, check_positive, require
from caploc.evaluator import Evaluator
from caploc.experiments.context import (TaskOptions, build_tasks, open_store, parse_task_list, resolve_model,
                                        resolve_task)
from caploc.experiments.evaluate import HEAD_SCORES
from caploc.experiments.results import LocateResult, UniversalResult
from caploc.methods import (DEFAULT_EXCHANGE, DEFAULT_MASKS, DEFAULT_METHOD, DEFAULT_PENALTY, DEFAULT_SCREEN,
                            DEFAULT_SPARSITY, DEFAULT_TOLERANCE, Objective, make_method)
from caploc.models import DEFAULT_MODEL, LoadedModel
from caploc.stats import low_baseline_warning, score_summary
from caploc.store import EvalStore
from caploc.tasks.base import Task


def drop_curve(evaluator: Evaluator, ranking: list[int], k: int, seed: int) -> dict:
    """Ablate the top-1, top-2, ..., top-k heads (cumulatively) and measure every metric's paired drop."""
    masks = [ranking[:j] for j in range(0, k + 1)]
    result = evaluator.evaluate(masks)
    return {name: [score_summary(values[0], values[j], seed) | {"k": j} for j in range(1, k + 1)]
            for name, values in result.scores.items()}


CONTROL_DEFAULT = "general"
# control items per mask: greedy rounds evaluate the controls only where they can change the choice, so a set
# large enough to see a head's damage costs little (12 items missed layer-1 heads that cost `general` 30 points)
DEFAULT_N_CONTROL = 24
DEFAULT_BOOTSTRAP = 200


def _control_tasks(control) -> list:
    """`control`: task names (comma-separated or a list), or None / "none" / "" for the paper's objective."""
    if control is None or (isinstance(control, str) and control.strip().lower() in ("", "none")):
        return []
    return build_tasks(parse_task_list(control), None, None)


def selection_frequency(method, objective: Objective, k: int, n_boot: int, seed: int,
                        details: dict | None = None) -> np.ndarray:
    """Per head, the share of bootstrap resamples of the identification items (target and control resampled
    independently) in which the method, replayed on the stored per-item scores, puts it in its top-k. No new
    model call: greedy-type methods whose replay leaves the evaluated path complete their top-k from the
    ranking of the round where it left; CS refits with the penalty its run chose (`details`)."""
    replay = method.for_replay(details) if details is not None else method
    counts = np.zeros(objective.n_heads)
    rng = np.random.default_rng([seed, 0xB007])
    for _ in range(n_boot):
        counts[replay.run(objective.resampled(rng), k).top(k)] += 1
    return counts / n_boot


def locate(model: str | LoadedModel = DEFAULT_MODEL, task: str | Task = "arithmetic", method: str = DEFAULT_METHOD,
           k: int = 5, n: int = 100, seed: int = 0, *, control: str | list | None = CONTROL_DEFAULT,
           n_control: int | None = None, penalty: float = DEFAULT_PENALTY, tolerance: float | None = DEFAULT_TOLERANCE,
           screen: str = DEFAULT_SCREEN, n_candidates: int | None = None, exchange: int = DEFAULT_EXCHANGE,
           n_masks: int = DEFAULT_MASKS, sparsity: float = DEFAULT_SPARSITY,
           alpha="cv", metric: str | None = None, n_validate: int | None = None, bootstrap: int = DEFAULT_BOOTSTRAP,
           seeds: list[int] | None = None, subtask: str | None = None,
           shots: int | None = None, data: str | None = None, fewshot_data: str | None = None,
           chat: bool | None = None, allow_code_execution: bool | None = None, dtype: str = "auto", device: str = "auto",
           workers: int | None = None, ray_address: str | None = None,
           mode: str = "zero", max_new_tokens: int | None = None, exclude: str | list[str] | None = None,
           exclude_universal: str | Path | None = None, store: str | Path | EvalStore | None = None,
           out: str | Path | None = None, progress: bool = False) -> LocateResult:
    """Identify the top-k heads of a capability on `n` items, then validate them on `n_validate` held-out items.

    `control` tasks (default `general`; None or "none" for the paper's plain objective) are evaluated on every
    mask too, on `n_control` identification items (default min(n, 12)), and methods maximize the specificity criterion
    with `penalty` and `tolerance` (methods.base); held-out control items measure the chosen heads' control drop.
    `bootstrap` resamples of the identification items give each head's selection frequency; `seeds` runs the
    whole identification once per seed (items and method randomness) and reports how often each head recurs.
    `exclude` heads, and the heads a `universal` result (`exclude_universal`: its file or directory) flags,
    are never reported."""
    check_positive("k", k)
    require(penalty >= 0, "{penalty} must be >= 0", "penalty")
    require(tolerance is None or tolerance >= 0, "{tolerance} must be >= 0", "tolerance")
    require(bootstrap >= 0, "{bootstrap} must be >= 0", "bootstrap")
    if seeds:
        return _locate_seeds(locals())
    started = time.perf_counter()
    lm = resolve_model(model, dtype, device, workers, ray_address)
    options = TaskOptions(subtask, shots, data, fewshot_data, chat, allow_code_execution)
    task_obj = resolve_task(task, options)
    control_tasks = _control_tasks(control)
    metric = metric or task_obj.identification_metric
    universal = UniversalResult.load(exclude_universal).universal_heads if exclude_universal else None
    excluded = sorted({lm.layout.index(h) for h in lm.layout.parse_list(exclude) + lm.layout.parse_list(universal)})
    notes = []
    if method == "refine" and screen == "atp" and not _has_gradients(task_obj, metric, control_tasks):
        # generation scores (pass@1, a rhyme, a swear count) have no gradient: screen by regression instead
        screen = "csb"
        notes.append(f"the {metric} metric of {task_obj.name} (or a control's) has no gradient, so the refine "
                     f"screen is csb instead of atp")
    method_obj = make_method(method, n_masks=n_masks, sparsity=sparsity, alpha=alpha, seed=seed, screen=screen,
                             n_candidates=n_candidates, exchange=exchange)
    id_items = task_obj.items(n, seed)
    held_out = task_obj.items(n_validate or n, seed, offset=n)
    db = open_store(store)
    common = dict(mode=mode, store=db, progress=progress, max_new_tokens=max_new_tokens)
    identify = Evaluator(lm, task_obj, id_items, **common)
    validate = Evaluator(lm, task_obj, held_out, **common)
    n_control = n_control or min(n, DEFAULT_N_CONTROL)
    control_id = [Evaluator(lm, t, t.items(n_control, seed), **common) for t in control_tasks]
    control_val = [Evaluator(lm, t, t.items(n_validate or n_control, seed, offset=n_control), **common)
                   for t in control_tasks]
    if metric not in identify.metric_names():
        raise ParameterError(f"task {task_obj.name} has no {{metric}} {metric!r}: use "
                             f"{', '.join(identify.metric_names())}", "metric")
    objective = Objective(identify, metric, control_id, penalty, tolerance)
    result = method_obj.run(objective, k)
    requested = objective.requested
    frequency = selection_frequency(method_obj, objective, k, bootstrap, seed, result.details) if bootstrap else None
    ranking = [i for i in result.ranking if i not in excluded]
    top = ranking[:k]
    identification = drop_curve(identify, ranking, k, seed)
    validation = drop_curve(validate, ranking, k, seed)
    control_validation = {t.task.name: drop_curve(t, ranking, k, seed) for t in control_val}
    layout = lm.layout
    evaluators = [identify, validate, *control_id, *control_val]
    per_mask = sum(e.tokens_per_mask() or 0 for e in [identify, *control_id]) or None
    per_target_mask = identify.tokens_per_mask()
    per_control_mask = sum(e.tokens_per_mask() or 0 for e in control_id)
    gradient_tokens = sum(e.stats.gradient_tokens for e in [identify, *control_id])
    located = LocateResult(
        model=lm.describe(), task=task_obj.config(), task_options=options.recorded(),
        method={"name": method, **method_obj.params()},
        k=k, n=len(id_items), n_validate=len(held_out), seed=seed, mode=mode, metric=metric,
        control={"tasks": [t.config() for t in control_tasks], "metrics": objective.control_metrics,
                 "n": n_control if control_tasks else 0, "penalty": penalty, "tolerance": tolerance,
                 "criterion": "1 - exp(-target_drop/|target_baseline|) - penalty * mean over controls of "
                              "max(relative drop, 0)"
                              + ("; a set whose control drop exceeds the tolerance ranks below every set within it"
                                 if tolerance is not None else "")
                 if control_tasks else "target drop (no control)"},
        excluded_heads=[str(layout.head(i)) for i in excluded],
        heads=[{"rank": r + 1, "head": str(layout.head(i)), "index": i, "score": float(result.head_scores[i]),
                "kv_group": layout.kv_group(layout.head(i))}
               | ({"selection_frequency": float(frequency[i])} if frequency is not None else {})
               for r, i in enumerate(top)],
        score_name=result.score_name, head_scores=[float(x) for x in result.head_scores],
        head_effects=_effects(result, objective),
        ranking=[str(layout.head(i)) for i in ranking], details=result.details,
        identification=identification, validation=validation, control_validation=control_validation,
        attention_check=attention_check(lm, task_obj, top),
        stability={"bootstrap": bootstrap, "selection_frequency": frequency.tolist(),
                   "top_k_mean_frequency": float(frequency[top].mean())} if frequency is not None else {},
        fingerprints={"model": lm.fingerprint, "identification_items": identify.task_fingerprint,
                      "validation_items": validate.task_fingerprint,
                      "control_items": [e.task_fingerprint for e in control_id]},
        budget={
            "evaluations": requested,
            "control_evaluations": objective.control_requested,
            "computed_evaluations": sum(e.stats.evaluations for e in evaluators),
            "reused_evaluations": sum(e.stats.reused for e in evaluators),
            "model_tokens": sum(e.stats.tokens for e in evaluators),
            "method_model_tokens": sum(e.stats.tokens for e in [identify, *control_id]),
            # gradients are never stored: their cost is the same on a rerun
            "gradient_model_tokens": gradient_tokens,
            "tokens_per_evaluation": per_mask,
            # what the method costs whatever the store held: masks asked for on the target and on the controls
            # (greedy rounds skip controls that cannot change their choice), shared prefixes once, and gradients
            "logical_model_tokens": (requested * per_target_mask + objective.control_requested * per_control_mask
                                     + gradient_tokens) if per_target_mask else None,
            "wall_seconds": round(time.perf_counter() - started, 2),
        },
        store=str(db.path) if db else None)
    located.warnings += notes
    if "acc" in validation:
        note = low_baseline_warning(task_obj.name, validation["acc"][0]["baseline"], metric)
        located.warnings += [note] if note else []
    if out:
        located.save(out)
    return located


ATTENTION_TOP = 10  # the highest heads by the attention signature that the reported heads are checked against
# tasks whose heads the literature finds by their attention: the signature (`heads --scores TASK`), its source
ATTENTION_CHECKS = {"induction": ("prefix_matching", "Olsson et al. 2022, repeated random tokens"),
                    "ioi": ("name_mover", "Wang et al. 2022, last token to the indirect object")}


def attention_check(lm: LoadedModel, task: Task, top: list[int]) -> dict:
    """Evidence independent of ablation, for a task whose heads the literature identifies by their attention
    (induction heads attend to the token after the current token's previous occurrence; IOI's name movers
    attend from the last token to the indirect object): which of the reported heads are among the
    ATTENTION_TOP highest by that signature; empty for other tasks."""
    if task.name not in ATTENTION_CHECKS:
        return {}
    key, source = ATTENTION_CHECKS[task.name]
    scores = HEAD_SCORES[task.name](lm)[key].reshape(-1)
    best = [int(i) for i in np.argsort(-scores, kind="stable")[:ATTENTION_TOP]]
    name = lm.layout.head
    return {"score": key, "source": source,
            "top": [str(name(i)) for i in best], "top_scores": [float(scores[i]) for i in best],
            "reported_in_top": [str(name(i)) for i in top if i in best],
            "reported_scores": {str(name(i)): float(scores[i]) for i in top}}


def _effects(result, objective: Objective) -> dict:
    """Per head: the method's estimate of its ablation's target drop and control drop."""
    def listed(values):
        return None if values is None else [float(v) for v in np.asarray(values, dtype=np.float64)]

    return {"target": listed(result.target_effects), "control": listed(result.control_effects),
            "target_units": f"{objective.metric} drop",
            "control_units": "control damage: mean over the controls of the relative drop, an improvement as 0"}


def _has_gradients(task: Task, metric: str, controls: list[Task]) -> bool:
    """Whether the identification metric (and each control's) has a gradient (AtP can screen)."""
    return task.has_gradient(metric) and all(c.has_gradient(c.identification_metric) for c in controls)


def _locate_seeds(arguments: dict) -> LocateResult:
    """One run per seed (each its own items and method randomness); the first seed's result, with how often each
    head recurs in the seeds' top-k and their pairwise overlaps."""
    arguments = dict(arguments)
    seeds = [int(s) for s in arguments.pop("seeds")]
    # one model and one store for every seed
    arguments["model"] = resolve_model(arguments["model"], arguments["dtype"], arguments["device"],
                                       arguments["workers"], arguments["ray_address"])
    arguments["store"] = open_store(arguments["store"])
    out = arguments.pop("out")
    runs = []
    for seed in seeds:
        runs.append(locate(**{**arguments, "seed": seed, "seeds": None, "out": None}))
    k = arguments["k"]
    tops = [r.top_heads(k) for r in runs]
    counts: dict[str, int] = {}
    for top in tops:
        for h in top:
            counts[h] = counts.get(h, 0) + 1
    pairs = [len(set(a) & set(b)) for i, a in enumerate(tops) for b in tops[i + 1:]]
    first = runs[0]
    first.stability = dict(first.stability) | {
        "seeds": seeds, "top_k_per_seed": tops,
        "seed_frequency": {h: c / len(seeds) for h, c in sorted(counts.items(), key=lambda x: -x[1])},
        "pairwise_overlap": pairs, "mean_pairwise_overlap": float(np.mean(pairs)) if pairs else None}
    for h in first.heads:
        h["seed_frequency"] = counts.get(h["head"], 0) / len(seeds)
    if first.attention_check:
        best = set(first.attention_check["top"])
        first.attention_check = dict(first.attention_check) | {
            "reported_in_top_per_seed": [[h for h in top if h in best] for top in tops]}
    first.budget = dict(first.budget) | {"all_seeds_model_tokens": sum(r.budget["model_tokens"] for r in runs)}
    if out:
        first.save(out)
    return first
