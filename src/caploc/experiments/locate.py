"""`caploc locate`: identify the top-k heads of a capability on some items, validate them on held-out items."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from caploc.errors import CaplocError, require
from caploc.evaluator import Evaluator
from caploc.experiments.results import LocateResult, UniversalResult
from caploc.experiments.specs import (EvalOptions, ModelSpec, Runtime, TaskSpec, build_tasks, cli, parse_ints,
                                      parse_task_list)
from caploc.methods import DEFAULT_METHOD, DEFAULT_PENALTY, DEFAULT_TOLERANCE, Method, Objective, make_method
from caploc.methods.exchange import CONFIDENCE, RESAMPLES, support
from caploc.models import DEFAULT_MODEL, LoadedModel
from caploc.stats import low_baseline_warning, score_summary
from caploc.tasks.base import OWN_METRIC, Task

CONTROL_DEFAULT = "general"
# control items per mask: greedy rounds evaluate the controls only where they can change the choice, so a set
# large enough to see a head's damage costs little
DEFAULT_N_CONTROL = 24
DEFAULT_BOOTSTRAP = 200
ATTENTION_TOP = 10  # the highest heads by the attention signature that the reported heads are checked against
AUTO_K = "auto"
CRITERION_TEXT = ("target share removed - penalty * mean over controls of max(share removed, 0); the share of a "
                  "log-probability is of the answer's probability, 1 - exp(-drop), of a score 1 - exp(-drop/|baseline|) "
                  "(target) or drop/|baseline| (control)")


@dataclass(frozen=True)
class Criterion:
    """What the heads are chosen by: the identification metric, and the control tasks whose damage counts
    against a head set (the specificity criterion of `methods.base`); `control` None or "none" is the
    paper's plain objective, the target drop."""

    metric: str | None = field(default=None, metadata=cli(
        "--metric", help="identification metric (default: logprob where the target is known, the reference's "
                         "ref_logprob for generation tasks that have one, else the task score; own_logprob for "
                         "any generation task: its identification items that the model does, each scored on "
                         "the model's own completion)"))
    control: str | list | None = field(default=CONTROL_DEFAULT, metadata=cli(
        "--control", help="control task(s) evaluated on every mask; heads are chosen by the share of the target "
                          "removed minus --penalty x the controls' damage ('text': prose language modelling); "
                          "'none' for the paper's plain objective"))
    n_control: int | None = field(default=None, metadata=cli(
        "--n-control", help=f"control identification items (default: min(--n, {DEFAULT_N_CONTROL}))"))
    penalty: float = field(default=DEFAULT_PENALTY, metadata=cli(
        "--penalty", help="weight of the controls' damage (the share of the control removed)"))
    tolerance: float | None = field(default=DEFAULT_TOLERANCE, metadata=cli(
        "--control-tolerance", help="optional: the control's share removed a head set may cost before it ranks "
                                    "below every set within it (use with a large --n-control)"))

    def __post_init__(self):
        require(self.penalty >= 0, "{penalty} must be >= 0", "penalty")
        require(self.tolerance is None or self.tolerance >= 0, "{tolerance} must be >= 0", "tolerance")

    def n_control_items(self, n: int) -> int:
        """The control identification items of a locate on `n` target items."""
        return self.n_control or min(n, DEFAULT_N_CONTROL)

    def objective(self, rt: Runtime, identify: Evaluator, metric: str, n: int, seed: int) -> Objective:
        """What a locate on `n` target items of `seed` maximizes: `identify` scored by `metric`, against the
        control tasks on their identification items (seed's draw of `n_control_items(n)`)."""
        controls = [rt.evaluator(t, t.items(self.n_control_items(n), seed)) for t in self.control_tasks()]
        return Objective(identify, metric, controls, self.penalty, self.tolerance)

    def control_tasks(self) -> list[Task]:
        control = self.control
        if control is None or (isinstance(control, str) and control.strip().lower() in ("", "none")):
            return []
        return build_tasks(parse_task_list(control), None, None)


@dataclass(frozen=True)
class LocateOptions:
    """Evidence and filters around the identification: bootstrap resamples of the items (selection
    frequency), whole runs on other seeds (recurrence), heads never reported."""

    bootstrap: int = field(default=DEFAULT_BOOTSTRAP, metadata=cli(
        "--bootstrap", help="item resamples for selection frequencies (no new model calls; 0 to skip)"))
    seeds: tuple[int, ...] | None = field(default=None, metadata=cli(
        "--seeds", help="comma-separated seeds: run each, report recurrence", parse=parse_ints))
    exclude: str | None = field(default=None, metadata=cli("--exclude", help="heads never reported, e.g. L0H1,L1"))
    exclude_universal: str | Path | None = field(default=None, metadata=cli(
        "--exclude-universal", help="never report the heads a `caploc universal` result flags (its --out "
                                    "directory or universal.json)"))

    def __post_init__(self):
        require(self.bootstrap >= 0, "{bootstrap} must be >= 0", "bootstrap")


def locate(model: ModelSpec | str | LoadedModel = DEFAULT_MODEL, task: TaskSpec | str | Task = "arithmetic",
           method: str | Method = DEFAULT_METHOD, *, k: int | str = 5, criterion: Criterion | None = None,
           options: LocateOptions | None = None, evaluation: EvalOptions | None = None,
           out: str | Path | None = None) -> LocateResult:
    """Identify the top-k heads of a capability on `task.n` items, then validate them on `task.n_validate`
    held-out items (the next items of the seeded order).

    The `criterion`'s control tasks (default `general`) are evaluated on every mask too, on `n_control`
    identification items (default min(n, 24)), and methods maximize the specificity criterion
    (methods.base); held-out control items measure the chosen heads' control drop. `options.bootstrap`
    resamples of the identification items give each head's selection frequency; `options.seeds` runs the
    whole identification once per seed (items and method randomness) and reports how often each head recurs.
    Each seed's set is then also scored under every other seed's criterion (`cross_seed_check`): a seed whose
    own items prefer another seed's set in nearly every resample gets a warning that its search stopped short.
    `method` is a registered name (`make_method`) or a Method; a method's `seed` is the run's. `k` "auto" lets
    a method that can (`joint`) choose the size: the smallest set that keeps most of what its candidates
    remove; the size chosen and the curve are in the result."""
    method = make_method(method) if isinstance(method, str) else method
    if k == AUTO_K:
        require(getattr(method, "supports_auto_k", False), f"{{k}} auto needs a method that chooses the size of its "
                f"set (joint), not {method.name}", "k")
    else:
        require(isinstance(k, int) and k > 0, "{k} must be positive (or auto)", "k")
    rt = Runtime.open(model, evaluation)
    spec = TaskSpec.of(task)
    criterion, options = criterion or Criterion(), options or LocateOptions()
    seeds = list(options.seeds or [])
    runs, objectives = zip(*(_locate_one(rt, spec.replace(seed=s) if seeds else spec, method, k, criterion, options)
                             for s in (seeds or [spec.seed])))
    located = runs[0] if not seeds else _with_recurrence(list(runs), list(objectives), seeds, k)
    if out:
        located.save(out)
    return located


def _locate_one(rt: Runtime, spec: TaskSpec, method: Method, k: int | str, criterion: Criterion,
                options: LocateOptions) -> tuple[LocateResult, Objective]:
    """One seed's locate, and the objective it maximized (its identification and control items)."""
    started = time.perf_counter()
    lm, seed, n = rt.lm, spec.seed, spec.n
    task = spec.build()
    metric = criterion.metric or task.identification_metric
    scoring = task.for_metric(metric)  # the task itself, or its reference view
    if "seed" in method.params():
        method = method.clone(seed=seed)
    universal = UniversalResult.load(options.exclude_universal).universal_heads if options.exclude_universal else None
    excluded = sorted({lm.layout.index(h) for h in lm.layout.parse_list(options.exclude)
                       + lm.layout.parse_list(universal)})
    n_validate = spec.n_validate or n
    own = own_references(rt, task, scoring, task.items(n, seed)) if metric == OWN_METRIC else None
    id_items = own["items"] if own else scoring.items(n, seed)
    held_out = task.items(n_validate, seed, offset=n)
    identify = rt.evaluator(scoring, id_items)
    validate = rt.evaluators(task, held_out)
    objective = criterion.objective(rt, identify, metric, n, seed)
    control_id = objective.controls
    control_tasks = [c.task for c in control_id]
    n_control = criterion.n_control_items(n)  # held-out control items start after the identification ones
    control_val = [rt.evaluator(t, t.items(spec.n_validate or n_control, seed, offset=n_control))
                   for t in control_tasks]
    result = method.run(objective, k)
    asked, k = k, (result.details["k"] if k == AUTO_K else k)  # the size the method chose, for "auto"
    frequency = (selection_frequency(method, objective, asked, options.bootstrap, seed, result.details, k)
                 if options.bootstrap else None)
    ranking = [i for i in result.ranking if i not in excluded]
    top = ranking[:k]
    validation = {}
    for evaluator in validate:  # the real metric by generation: baseline and all k only (generating is costly)
        curve = drop_curve(evaluator, ranking, k, seed, every_j=evaluator.task is scoring or
                           not evaluator.requests.generation)
        validation |= {name: points for name, points in curve.items() if name not in validation}
    layout = lm.layout
    evaluators = [identify, *validate, *control_id, *control_val] + ([own["evaluator"]] if own else [])
    located = LocateResult(
        model=lm.describe(), task=task.config(), task_options=spec.recorded(),
        method={"name": method.name, **method.params()},
        # n: the items drawn for identification (held-out items start after them), own_logprob keeps those done
        k=k, n=own["drawn"] if own else len(id_items), n_validate=len(held_out), seed=seed, mode=identify.mode,
        metric=metric,
        extra=({"k_asked": asked} if asked == AUTO_K else {})
        | ({"own_reference": {"drawn": own["drawn"], "done": len(id_items)}} if own else {}),
        control={"tasks": [t.config() for t in control_tasks], "metrics": objective.control_metrics,
                 "n": n_control if control_tasks else 0, "penalty": criterion.penalty,
                 "tolerance": criterion.tolerance,
                 "criterion": CRITERION_TEXT + ("; a set whose control drop exceeds the tolerance ranks below "
                                                "every set within it" if criterion.tolerance is not None else "")
                 if control_tasks else "target drop (no control)"},
        excluded_heads=[str(layout.head(i)) for i in excluded],
        heads=[{"rank": r + 1, "head": str(layout.head(i)), "index": i, "score": float(result.head_scores[i]),
                "kv_group": layout.kv_group(layout.head(i))}
               | ({"selection_frequency": float(frequency[i])} if frequency is not None else {})
               for r, i in enumerate(top)],
        score_name=result.score_name, head_scores=[float(x) for x in result.head_scores],
        head_effects=_effects(result, objective),
        ranking=[str(layout.head(i)) for i in ranking], details=result.details,
        identification=drop_curve(identify, ranking, k, seed), validation=validation,
        # the control with all k ablated only: what every report shows, at 2 masks (a 100-item control mask costs
        # more than a target one)
        control_validation={e.task.name: drop_curve(e, ranking, k, seed, every_j=False) for e in control_val},
        attention_check=attention_check(rt, task, top),
        stability={"bootstrap": options.bootstrap, "selection_frequency": frequency.tolist(),
                   "top_k_mean_frequency": float(frequency[top].mean())} if frequency is not None else {},
        fingerprints={"model": lm.fingerprint, "identification_items": identify.task_fingerprint,
                      "validation_items": validate[0].task_fingerprint,
                      "control_items": [e.task_fingerprint for e in control_id]},
        budget=_budget(objective, identify, control_id, evaluators, started),
        store=str(rt.store.path) if rt.store else None)
    located.warnings += list(result.details.get("notes", []))
    if "acc" in validation:
        note = low_baseline_warning(task.name, validation["acc"][0]["baseline"], metric)
        located.warnings += [note] if note else []
    return located, objective


def own_references(rt: Runtime, task: Task, view, items: list) -> dict:
    """`own_logprob`'s identification items: the unablated model generates once (stored like any evaluation),
    and the items it does keep its completion as their target (`view`: the task's OwnReferenceTask)."""
    generate = rt.evaluator(task, items)
    baseline, real_metric = generate.baseline(), task.metric_names()[0]
    done = view.from_generations(items, baseline.texts[0], baseline.scores[real_metric][0])
    if not done:
        raise CaplocError(f"{OWN_METRIC}: the model does none of the {len(items)} identification items of "
                          f"{task.name} (its {real_metric} is 0 on each); use --metric "
                          f"{task.identification_metric}")
    return {"items": done, "drawn": len(items), "evaluator": generate}


def drop_curve(evaluator: Evaluator, ranking: list[int], k: int, seed: int, every_j: bool = True) -> dict:
    """Ablate the top-1, top-2, ..., top-k heads (cumulatively; with `every_j` False, all k only) and measure
    every metric's paired drop."""
    sizes = list(range(1, k + 1)) if every_j else [k]
    result = evaluator.evaluate([[]] + [ranking[:j] for j in sizes])
    return {name: [score_summary(values[0], values[r], seed, name) | {"k": j} for r, j in enumerate(sizes, 1)]
            for name, values in result.scores.items()}


def selection_frequency(method: Method, objective: Objective, k: int | str, n_boot: int, seed: int,
                        details: dict | None = None, top: int | None = None) -> np.ndarray:
    """Per head, the share of bootstrap resamples of the identification items (target and control resampled
    independently) in which the method, replayed on the stored per-item scores, puts it in its top-k. No new
    model call: greedy-type methods whose replay leaves the evaluated path complete their top-k from the
    ranking of the round where it left; CS refits with the penalty its run chose (`details`). `top`: how many
    heads count as chosen (default k; with k "auto", the run's size)."""
    replay = method.for_replay(details) if details is not None else method
    counts = np.zeros(objective.n_components)
    rng = np.random.default_rng([seed, 0xB007])
    for _ in range(n_boot):
        counts[replay.run(objective.resampled(rng), k).top(top or k)] += 1
    return counts / n_boot


def attention_check(rt: Runtime, task: Task, top: list[int]) -> dict:
    """Evidence independent of ablation, for a task whose heads the literature identifies by their attention
    (induction heads attend to the token after the current token's previous occurrence; IOI's name movers
    attend from the last token to the indirect object): which of the reported heads are among the
    ATTENTION_TOP highest by that signature; empty for other tasks. The scores are stored with the
    evaluations (computed once per model)."""
    if task.attention_check is None:
        return {}
    key, source = task.attention_check

    def compute():
        return task.head_scores(rt.lm, seed=0)[key]

    stored = {"model": rt.lm.fingerprint, "head_scores": task.name, "seed": 0}
    scores = (rt.store.array(stored, key, compute) if rt.store else compute()).reshape(-1)
    best = [int(i) for i in np.argsort(-scores, kind="stable")[:ATTENTION_TOP]]
    name = rt.lm.layout.head
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
            "control_units": "control damage: mean over the controls of the share removed, an improvement as 0"}


def _budget(objective: Objective, identify: Evaluator, control_id: list[Evaluator], evaluators: list[Evaluator],
            started: float) -> dict:
    per_mask = sum(e.tokens_per_mask() or 0 for e in [identify, *control_id]) or None
    per_target_mask = identify.tokens_per_mask()
    per_control_mask = sum(e.tokens_per_mask() or 0 for e in control_id)
    gradient_tokens = sum(e.stats.logical_gradient_tokens for e in [identify, *control_id])
    return {
        "evaluations": objective.requested,
        "control_evaluations": objective.control_requested,
        "computed_evaluations": sum(e.stats.evaluations for e in evaluators),
        "reused_evaluations": sum(e.stats.reused for e in evaluators),
        "model_tokens": sum(e.stats.tokens for e in evaluators),
        "method_model_tokens": sum(e.stats.tokens for e in [identify, *control_id]),
        # gradients computed in this run (a rerun reads them from the store)
        "gradient_model_tokens": sum(e.stats.gradient_tokens for e in [identify, *control_id]),
        "tokens_per_evaluation": per_mask,
        # what the method costs whatever the store held: masks asked for on the target and on the controls
        # (greedy rounds skip controls that cannot change their choice), shared prefixes once, gradients, and
        # masks scored on the leading items only (`Objective.first_look`)
        "logical_model_tokens": (objective.requested * per_target_mask + objective.control_requested * per_control_mask
                                 + gradient_tokens + objective.first_look_tokens) if per_target_mask else None,
        "wall_seconds": round(time.perf_counter() - started, 2),
    }


def _with_recurrence(runs: list[LocateResult], objectives: list[Objective], seeds: list[int],
                     k: int | str) -> LocateResult:
    """The first seed's result, with how often each head recurs in the seeds' top-k, their pairwise overlaps,
    and each seed's set scored under every seed's criterion (`cross_seed_check`)."""
    tops = [r.top_heads(None if k == AUTO_K else k) for r in runs]
    counts: dict[str, int] = {}
    for top in tops:
        for h in top:
            counts[h] = counts.get(h, 0) + 1
    pairs = [len(set(a) & set(b)) for i, a in enumerate(tops) for b in tops[i + 1:]]
    first = runs[0]
    cross = cross_seed_check(objectives, [[h["index"] for h in r.heads] for r in runs], seeds)
    first.stability = dict(first.stability) | {
        "seeds": seeds, "top_k_per_seed": tops,
        "seed_frequency": {h: c / len(seeds) for h, c in sorted(counts.items(), key=lambda x: -x[1])},
        "pairwise_overlap": pairs, "mean_pairwise_overlap": float(np.mean(pairs)) if pairs else None,
        "cross_seed": cross}
    for h in first.heads:
        h["seed_frequency"] = counts.get(h["head"], 0) / len(seeds)
    first.warnings += [
        f"seed {miss['seed']}: the set of seed {miss['better_seed']} scores {miss['criterion']:.3f} on seed "
        f"{miss['seed']}'s own items against its own set's {miss['own_criterion']:.3f}, higher in "
        f"{miss['support']:.0%} of {RESAMPLES} item resamples: that seed's search stopped short"
        for miss in cross["search_stopped_short"]]
    if first.attention_check:
        best = set(first.attention_check["top"])
        first.attention_check = dict(first.attention_check) | {
            "reported_in_top_per_seed": [[h for h in top if h in best] for top in tops]}
    first.budget = dict(first.budget) | {"all_seeds_model_tokens": sum(r.budget["model_tokens"] for r in runs)}
    return first


def cross_seed_check(objectives: list[Objective], sets: list[list[int]], seeds: list[int]) -> dict:
    """Each seed's head set scored under every seed's criterion (that seed's identification and control items).
    Sets that differ between seeds either fit their own items equally well (the items' noise decides) or one
    seed's search stopped short: another seed's set beats its own on its own items in at least CONFIDENCE of
    RESAMPLES bootstrap resamples (the exchange pass's test). `criterion[i][j]`: seed j's set on seed i's items
    (`target_drop`, `control_damage`: its parts); `beats_own[i][j]`: that support; `best_seed`: the set with the
    highest mean criterion over all seeds' items. The other seeds' sets cost one mask each per seed (stored)."""
    criterion, target_drop, control_damage, beats_own, missed = [], [], [], [], []
    for i, objective in enumerate(objectives):
        target, control = objective.responses(objective.set_masks(sets))
        values = [float(v) for v in objective.specificity(target, control)]
        wins = [None if j == i else support(objective, sets[i], other, seed=seeds[i]) for j, other in enumerate(sets)]
        criterion.append(values)
        target_drop.append([float(v) for v in target])
        control_damage.append(None if control is None else [float(v) for v in control])
        beats_own.append(wins)
        missed += [{"seed": seeds[i], "better_seed": seeds[j], "criterion": values[j], "own_criterion": values[i],
                    "support": wins[j]}
                   for j in np.argsort([-v for v in values], kind="stable")
                   if j != i and wins[j] >= CONFIDENCE][:1]  # the best-scoring of the sets that beat it
    mean = np.mean(criterion, axis=0)
    return {"criterion": criterion, "target_drop": target_drop, "control_damage": control_damage,
            "beats_own": beats_own, "mean_criterion": [float(m) for m in mean],
            "best_seed": seeds[int(np.argmax(mean))], "search_stopped_short": missed,
            "resamples": RESAMPLES, "confidence": CONFIDENCE}
