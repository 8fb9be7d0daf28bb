"""Commonality Neuron Localization (CNL): neurons whose attribution is consistently high across the items of a
capability dataset (what the items have in common), checked by ablation and enhancement.

Attribution of neuron (l, i) on item x = sum over positions of activation x gradient of the correct answer's
log-probability with respect to that neuron's activation (the input of layer l's MLP down projection);
`method="ig"` uses integrated gradients from the zero activation instead (activation x mean gradient over
`steps` scalings of every neuron's activation). Selection rule: a neuron counts for an item when it is among
the item's top `top_q` fraction of neurons AND its attribution is positive (it supports the answer); the
commonality neurons are those counted for at least `min_share` of the items.

Reported: the overlap rate (share of the neurons located on split A found again on a disjoint split B) and
IoU; the drop when ablating the located neurons vs as many random neurons (task and general capability,
on split B); and the change when the located neurons' activations are scaled up by each `enhance` factor
(a sweep is the default: a small factor can help where a large one breaks the model).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from dataclasses import dataclass, field

from caploc.errors import CaplocError, ParameterError, require
from caploc.evaluator import Requests, pad_batch
from caploc.experiments.results import NeuronsResult
from caploc.experiments.specs import EvalOptions, ModelSpec, Runtime, TaskSpec, cli
from caploc.files import HashCache
from caploc.models import DEFAULT_MODEL, LoadedModel
from caploc.sites import neuron_site
from caploc.stats import score_summary
from caploc.tasks.base import Item, LoglikelihoodTask, Task

ATTRIBUTION_METHODS = ("grad", "ig")


def neuron_attributions(lm: LoadedModel, task: Task, items: list[Item], method: str = "grad", steps: int = 8,
                        batch_size: int = 8, progress: bool = False) -> np.ndarray:
    """[n_items, n_neurons] attribution of each item's correct-answer log-probability to every neuron."""
    require(method in ATTRIBUTION_METHODS,
            f"unknown attribution {{method}} {method!r}: choose one of {', '.join(ATTRIBUTION_METHODS)}", "method")
    if not isinstance(task, LoglikelihoodTask):
        raise CaplocError(f"CNL needs a known answer: task {task.name} is a generation task without references; "
                          f"use a target, multiple-choice or reference task")
    from tqdm.auto import tqdm

    model = lm.model
    site = neuron_site(model)
    # tokenized exactly as the ablation scores are (chat template, joint BPE merges)
    rows = Requests(lm.tokenizer, task, items).answer_sequences()
    out = np.zeros((len(items), site.n_total), dtype=np.float32)
    alphas = [(s + 0.5) / steps for s in range(steps)] if method == "ig" else [1.0]  # midpoint rule
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(rows), batch_size), desc="attribution", disable=not progress, leave=False):
        chunk = rows[start:start + batch_size]
        # right padding: real tokens never attend to pads
        ids, real = pad_batch([row_ids for row_ids, _ in chunk], lm.tokenizer.pad_token_id, device=device)
        real = real[:, :, None, None].float()
        total = None
        acts_at_one = None
        for alpha in alphas:
            acts: list[torch.Tensor] = []

            def capture(layer: int, units: torch.Tensor) -> torch.Tensor:
                scaled = units * alpha if alpha != 1.0 else units
                acts.append(scaled)
                return scaled

            with torch.enable_grad(), site.hooked(capture):
                logits = model(input_ids=ids).logits.float()
                logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
                answer_lp = 0
                for r, (row_ids, answer_start) in enumerate(chunk):
                    targets = torch.tensor(row_ids[answer_start:], device=device)
                    positions = torch.arange(answer_start - 1, len(row_ids) - 1, device=device)
                    answer_lp = answer_lp + logprobs[r, positions, targets].sum()
                grads = torch.autograd.grad(answer_lp, acts)
            with torch.no_grad():
                g = torch.stack([(gr * real).float()[..., 0] for gr in grads], dim=1)  # [b, layers, seq, units]
                total = g if total is None else total + g
                if alpha == alphas[-1] or method == "grad":
                    # IG integrates along a*x; the attribution multiplies by the full activation x
                    acts_at_one = torch.stack([(a / alpha * real).float()[..., 0] for a in acts], dim=1)
        with torch.no_grad():
            attribution = (acts_at_one * total / len(alphas)).sum(dim=2)  # sum over positions
            out[start:start + len(chunk)] = attribution.reshape(len(chunk), -1).cpu().numpy()
    return out


def select_commonality(attributions: np.ndarray, top_q: float = 0.01, min_share: float = 0.5) -> list[int]:
    """Neurons in an item's top `top_q` fraction with positive attribution, for >= `min_share` of items;
    most frequent first (ties: larger mean attribution)."""
    require(0 < top_q <= 1 and 0 < min_share <= 1, "{top_q} and {min_share} must be in (0, 1]", "top_q", "min_share")
    n_items, n_neurons = attributions.shape
    k = max(1, int(round(top_q * n_neurons)))
    top = np.argpartition(-attributions, k - 1, axis=1)[:, :k]
    counted = np.zeros(n_neurons)
    for i in range(n_items):
        chosen = top[i][attributions[i, top[i]] > 0]
        counted[chosen] += 1
    share = counted / n_items
    selected = np.flatnonzero(share >= min_share)
    mean_attr = attributions.mean(axis=0)
    return [int(i) for i in sorted(selected, key=lambda i: (-share[i], -mean_attr[i]))]


def overlap_stats(a: list[int], b: list[int]) -> dict:
    sa, sb = set(a), set(b)
    inter, union = len(sa & sb), len(sa | sb)
    return {"n_a": len(sa), "n_b": len(sb), "shared": inter,
            "overlap_rate": inter / len(sa) if sa else float("nan"),
            "overlap_rate_b": inter / len(sb) if sb else float("nan"),
            "iou": inter / union if union else float("nan")}


def _cached_attributions(lm, task, items, method, steps, progress) -> np.ndarray:
    key = {"model": lm.fingerprint, "task": task.fingerprint(items), "method": method,
           "steps": steps if method == "ig" else None}
    return HashCache("attributions", ".npy").get_or_compute(
        key, lambda: neuron_attributions(lm, task, items, method, steps, progress=progress))


def _factors(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(f) for f in text.split(",") if f.strip())
    except ValueError:
        raise ParameterError(f"{{enhance}}: not comma-separated numbers: {text!r}", "enhance") from None


@dataclass(frozen=True)
class CNLOptions:
    """Commonality Neuron Localization: the attribution, the selection rule, the enhancement factors, and the
    general-capability control."""

    method: str = field(default="grad", metadata=cli("--method", help="attribution: grad (activation x gradient) "
                                                                      "or ig (integrated gradients)"))
    steps: int = field(default=8, metadata=cli("--steps", help="integrated-gradients steps"))
    top_q: float = field(default=0.01, metadata=cli("--top-q", help="an item's top fraction of neurons"))
    min_share: float = field(default=0.5, metadata=cli("--min-share", help="share of items a neuron must be "
                                                                           "counted for"))
    enhance: tuple[float, ...] | float = field(default=(1.1, 1.3, 2.0), metadata=cli(
        "--enhance", help="comma-separated factors to scale the located neurons by (a sweep)", parse=_factors))
    general: str | None = field(default="general", metadata=cli("--general", help="general-capability task to "
                                                                                  "ablate on ('' for none)"))
    n_general: int = 50


def neurons(model: ModelSpec | str | LoadedModel = DEFAULT_MODEL, task: TaskSpec | str | Task = "arithmetic",
            options: CNLOptions | None = None, *, evaluation: EvalOptions | None = None,
            out: str | Path | None = None) -> NeuronsResult:
    """Locate commonality neurons on split A (n items), again on a disjoint split B, and test split A's
    neurons on split B: ablation vs as many random neurons, and enhancement by each factor. A generation task
    with references is attributed on its reference's log-probability."""
    started = time.perf_counter()
    o = options or CNLOptions()
    rt = Runtime.open(model, evaluation)
    lm = rt.lm
    spec = TaskSpec.of(task)
    n, seed, method, steps = spec.n, spec.seed, o.method, o.steps
    task_obj = spec.build()
    task_obj = task_obj.for_metric(task_obj.identification_metric)  # generation: its reference view
    layout = neuron_site(lm.model).layout
    split_a, split_b = task_obj.items(n, seed), task_obj.items(n, seed, offset=n)
    progress = rt.options.progress
    attr_a = _cached_attributions(lm, task_obj, split_a, method, steps, progress)
    attr_b = _cached_attributions(lm, task_obj, split_b, method, steps, progress)
    located_a = select_commonality(attr_a, o.top_q, o.min_share)
    located_b = select_commonality(attr_b, o.top_q, o.min_share)
    if not located_a:
        raise ParameterError(f"no neuron is in the top {o.top_q:.1%} of at least {o.min_share:.0%} of the items: "
                             f"raise {{top_q}} or lower {{min_share}}", "top_q", "min_share")
    rng = np.random.default_rng(seed)
    random_set = sorted(int(i) for i in rng.choice(np.setdiff1d(np.arange(layout.n_total), located_a),
                                                   size=len(located_a), replace=False))
    metric = task_obj.identification_metric
    results = {}
    tasks = [("task", task_obj, split_b)]
    if o.general:
        general_task = TaskSpec.of(o.general).build()
        tasks.append(("general", general_task, general_task.items(o.n_general, seed)))
    for label, t, items in tasks:
        scores = rt.evaluator(t, items, components="neurons").evaluate([[], located_a, random_set]).scores
        t_metric = metric if label == "task" else t.identification_metric
        entry = {"task": t.config(), "n": len(items), "metric": t_metric,
                 "located": score_summary(scores[t_metric][0], scores[t_metric][1], seed, t_metric),
                 "random": score_summary(scores[t_metric][0], scores[t_metric][2], seed, t_metric)}
        if "acc" in scores and t_metric != "acc":
            entry["located_acc"] = score_summary(scores["acc"][0], scores["acc"][1], seed)
            entry["random_acc"] = score_summary(scores["acc"][0], scores["acc"][2], seed)
        results[label] = entry
    enhancement = []
    for factor in ([o.enhance] if isinstance(o.enhance, (int, float)) else list(o.enhance)):
        enhanced = rt.evaluator(task_obj, split_b, components="neurons", scale=factor).evaluate(
            [[], located_a, random_set]).scores
        # "drop" < 0 is an improvement; the random neurons scaled alike are the control
        enhancement.append({"factor": float(factor), "metrics": {
            m: score_summary(enhanced[m][0], enhanced[m][1], seed, m) for m in enhanced},
            "random_metrics": {m: score_summary(enhanced[m][0], enhanced[m][2], seed, m) for m in enhanced}})
    per_layer = np.bincount([i // layout.n_units for i in located_a], minlength=layout.n_layers)
    report = NeuronsResult(
        model=lm.describe(), task=task_obj.config(), n=n, seed=seed,
        attribution={"method": method, "steps": steps if method == "ig" else None},
        rule={"top_q": o.top_q, "min_share": o.min_share, "n_neurons_total": layout.n_total,
              "per_item_top": max(1, int(round(o.top_q * layout.n_total)))},
        neurons=[str(layout.neuron(i)) for i in located_a],
        neurons_split_b=[str(layout.neuron(i)) for i in located_b],
        per_layer=per_layer.tolist(),
        overlap=overlap_stats(located_a, located_b),
        random_neurons=[str(layout.neuron(i)) for i in random_set],
        ablation=results,
        enhancement=enhancement,
        fingerprints={"split_a": task_obj.fingerprint(split_a), "split_b": task_obj.fingerprint(split_b)},
        wall_seconds=round(time.perf_counter() - started, 2),
    )
    if out:
        report.save(out)
    return report
