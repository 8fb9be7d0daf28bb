"""The one batched evaluator: a task's items under MANY ablation masks.

Every method in caploc calls `Evaluator.evaluate(masks)`; nothing else runs the model on task items. It
composes what to score (`requests`), how to run it (`scoring`, `gradients` and `generation`: batched passes
under per-row masks), where the chunks run (`backend`) and what is already known (`cache`: memory + the
persistent store); the task turns raw log-likelihoods or generations into its metrics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from caploc.ablation import component_ablation
from caploc.errors import CaplocError, ParameterError
from caploc.evaluator.backend import IN_PROCESS, Backend
from caploc.evaluator.cache import ScoreCache
from caploc.evaluator.generation import Generator
from caploc.evaluator.gradients import GradientRunner
from caploc.evaluator.requests import Requests
from caploc.evaluator.runner import EvalStats
from caploc.evaluator.scoring import Scorer
from caploc.files import content_key
from caploc.masks import Masks, mask_key
from caploc.models import LoadedModel
from caploc.tasks.base import Item, Task

MAX_PLANNED = 256  # masks compared pairwise when choosing a base mask to start the others from

# what a worker process needs besides the model to build the same evaluator (`recipe`); the store, the
# progress bar and the backend stay with the driver
_DRIVER_ONLY = ("self", "lm", "store", "progress", "backend", "stats")


def _point_key(multipliers: np.ndarray) -> str:
    """Where a gradient is taken, as a key: the mask of the components held at 0 when every multiplier is 0 or
    1, else a hash of the multipliers."""
    if np.isin(multipliers, (0.0, 1.0)).all():
        return mask_key(multipliers == 0.0)
    return "x:" + content_key(multipliers.tobytes().hex())


@dataclass
class EvalResult:
    """Scores of every item under every mask: `scores[metric]` is [n_masks, n_items]."""

    masks: Masks
    scores: dict[str, np.ndarray]
    item_ids: list[str]
    texts: list[list[str]] | None = None  # generation tasks: [n_masks][n_items]

    def mean(self, metric: str) -> np.ndarray:
        if metric not in self.scores:
            raise CaplocError(f"metric {metric!r} not computed; available: {', '.join(self.scores)}")
        return self.scores[metric].mean(axis=1)


class Evaluator:
    def __init__(self, lm: LoadedModel, task: Task, items: list[Item], *, mode: str = "zero",
                 batch_tokens: int | None = None, store=None, progress: bool = False,
                 reference_items: list[Item] | None = None, max_new_tokens: int | None = None,
                 components: str = "heads", scale: float = 0.0, backend: Backend | None = None,
                 stats: EvalStats | None = None):
        """`components`: what a mask column is (attention heads, or MLP neurons); `scale`: what a masked
        component is multiplied by (0 ablates; above 1 enhances); `batch_tokens`: tokens per forward pass
        (default: from free memory on an accelerator, 8192 on CPUs); `backend`: where chunks of masks run
        (default: this process); `stats`: the counters to add to (default: its own)."""
        self.recipe = {k: v for k, v in locals().items() if k not in _DRIVER_ONLY}
        self.lm = lm
        self.task = task
        self.requests = Requests(lm.tokenizer, task, items)
        self.items = self.requests.items
        self.mode = mode
        self.progress = progress
        self.backend = backend or IN_PROCESS
        self.max_new_tokens = max_new_tokens or task.max_new_tokens
        self.components = components
        self.scale = float(scale)
        self.stats = stats or EvalStats()
        self.ablation = component_ablation(lm.model, components, mode)
        runner_args = (lm, self.ablation, self.stats, batch_tokens, self.scale)
        self.scorer = Scorer(*runner_args)
        self.gradient_runner = GradientRunner(*runner_args)
        self.generator = Generator(*runner_args)
        if mode == "mean":
            reference = Requests(lm.tokenizer, task, reference_items or self.items)
            self.ablation.fit_means(lambda setter: self.scorer.reference(reference, setter))
        self.task_fingerprint = task.fingerprint(self.items)
        key = {"model": lm.fingerprint, "task": self.task_fingerprint, "mode": self.mode,
               "max_new_tokens": self.max_new_tokens if self.requests.generation else None}
        if components != "heads" or self.scale != 0.0:  # head ablation keeps the keys it always had
            key |= {"components": components, "scale": self.scale}
        if self.requests.packed:  # left-padded packs: in bf16 a row's scores depend on its pack's layout
            key |= {"packs": "by length"}
        self.cache = ScoreCache(key, self.metric_names(), store, self.stats,
                                self._score_texts if self.requests.generation else None)

    def _score_texts(self, texts: list[str]) -> dict[str, list[float]]:
        return {m: v[0].tolist() for m, v in self.task.process_generations(self.items, [texts]).items()}

    def subset(self, n: int) -> "Evaluator":
        """The same evaluation on the first `n` items only (its own store entries; the counters are this
        evaluator's): a cheap first look at masks that are then scored on every item only if they may matter."""
        reference = self.recipe["reference_items"] or self.items  # mean ablation keeps the whole reference's means
        recipe = self.recipe | {"items": self.items[:n], "reference_items": reference}
        return Evaluator(self.lm, **recipe, store=self.store, progress=self.progress, backend=self.backend,
                         stats=self.stats)

    # hooks live only inside each forward pass; closing is kept for callers that manage scope explicitly
    def close(self) -> None:
        pass

    def __enter__(self) -> "Evaluator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def n_components(self) -> int:
        """Mask width: the number of components (heads, or neurons)."""
        return self.ablation.n_total

    @property
    def per_layer(self) -> int:
        """Components per layer (heads, or MLP neurons): mask column c is unit c % per_layer of layer
        c // per_layer."""
        return self.ablation.site.n_units

    @property
    def store(self):
        return self.cache.store

    def key(self) -> dict:
        """What identifies an evaluation besides its mask (the store's key)."""
        return self.cache.key

    def metric_names(self) -> tuple[str, ...]:
        return self.task.metric_names()

    def tokens_per_mask(self) -> int | None:
        return self.requests.tokens_per_mask()

    def answer_sequences(self) -> list[tuple[list[int], int]]:
        return self.requests.answer_sequences()

    def target_tokens(self) -> np.ndarray:
        return self.requests.target_tokens()

    def masks(self, masks) -> Masks:
        """`masks` (Masks, a bool array [n_masks, n_components], or component-index collections) as Masks."""
        return Masks.of(masks, self.n_components)

    # -- gradients -----------------------------------------------------------------------------------
    def gradients(self, metric: str, ablated=None, multipliers: np.ndarray | None = None) -> np.ndarray:
        """[n_items, n_components]: d metric(item) / d multiplier of each component, for metrics that are
        linear in the continuations' log-probabilities (logprob, logprob_all, logit_diff): a first-order
        estimate of every component's ablation effect from one forward + backward pass. At every multiplier
        1, or with the components `ablated` (indices or a bool vector) held at 0: the estimate on top of that
        ablation; or at any `multipliers` [n_components]."""
        return self.gradients_and_scores(metric, ablated, multipliers)[0]

    def gradients_and_scores(self, metric: str, ablated=None,
                             multipliers: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(gradients [n_items, n_components], the metric per item [n_items]) at the same point."""
        if not self.task.has_gradient(metric):
            linear = self.task.linear_metrics
            raise ParameterError(f"{{metric}} {metric!r} of task {self.task.name} has no gradient: use one of "
                                 f"{', '.join(linear) or 'none (a generation task)'}", "metric")
        if multipliers is None:
            multipliers = np.ones(self.n_components)
            if ablated is not None:
                held = np.asarray(ablated)
                multipliers[held if held.dtype == bool else self.masks([held.astype(int)]).rows[0]] = 0.0
        multipliers = np.asarray(multipliers, dtype=np.float64)
        key, point = self.key() | {"gradient": metric}, _point_key(multipliers)
        if self.store is not None:
            stored = [self.store.get_array(key, f"{point}/{part}") for part in ("gradients", "values", "tokens")]
            if all(x is not None for x in stored):
                self.stats.logical_gradient_tokens += int(stored[2])
                return stored[0], stored[1]
        started = time.perf_counter()
        before = self.stats.gradient_tokens
        weights = self._metric_weights(metric)
        grads, logprob = self.gradient_runner.sequence_gradients(self.requests, weights, multipliers)
        self.stats.seconds += time.perf_counter() - started
        item_of = np.array([seq.item for seq in self.requests.sequences])
        out = np.zeros((len(self.items), grads.shape[1]))
        np.add.at(out, item_of, grads)
        values = np.zeros(len(self.items))
        np.add.at(values, item_of, np.where(weights != 0, weights * np.nan_to_num(logprob), 0.0))
        values += self._metric_offsets(metric)
        tokens = self.stats.gradient_tokens - before
        self.stats.logical_gradient_tokens += tokens
        if self.store is not None:
            for part, value in (("gradients", out), ("values", values), ("tokens", np.array(tokens))):
                self.store.put_array(key, f"{point}/{part}", value)
        return out, values

    def _metric_of(self, metric: str, logprob: np.ndarray) -> np.ndarray:
        """The metric of every item, [rows, n_items], from [rows, n_sequences] log-probabilities."""
        per_item = self.requests.per_item
        no_greedy = [np.zeros_like(x, dtype=bool) for x in per_item(np.zeros_like(logprob))]
        return self.task.process_loglikelihoods(self.items, per_item(logprob), no_greedy,
                                                self.requests.lengths())[metric]

    def _metric_weights(self, metric: str) -> np.ndarray:
        """Per sequence s, d metric(item of s) / d log p(s): the metric is linear in the log-probabilities,
        so the task's own scoring applied to unit log-probabilities gives it."""
        n_seq = len(self.requests.sequences)
        slopes = self._metric_of(metric, np.eye(n_seq)) - self._metric_of(metric, np.zeros((n_seq, n_seq)))
        return slopes[np.arange(n_seq), [seq.item for seq in self.requests.sequences]]

    def _metric_offsets(self, metric: str) -> np.ndarray:
        """The metric of every item at log-probabilities 0 (its constant term)."""
        return self._metric_of(metric, np.zeros((1, len(self.requests.sequences))))[0]

    # -- scores --------------------------------------------------------------------------------------
    def baseline(self) -> EvalResult:
        return self.evaluate(Masks.none(1, self.n_components))

    def evaluate(self, masks) -> EvalResult:
        """Scores under every mask (anything `masks()` takes); each distinct mask computed once, ever."""
        masks = self.masks(masks)
        started = time.perf_counter()
        metrics = self.metric_names()
        scores = {m: np.zeros((len(masks), len(self.items)), dtype=np.float64) for m in metrics}
        texts: list[list[str]] | None = [[] for _ in range(len(masks))] if self.requests.generation else None
        todo: dict[str, list[int]] = {}  # identical masks in one request are computed once
        for row, key in enumerate(masks.keys()):
            record = self.cache.get(key)
            if record is None:
                todo.setdefault(key, []).append(row)
            else:
                self._fill(scores, texts, [row], record)
        if todo:
            self._compute(masks, list(todo.values()), scores, texts)
        self.stats.seconds += time.perf_counter() - started
        return EvalResult(masks=masks, scores=scores, item_ids=[i.id for i in self.items], texts=texts)

    @staticmethod
    def _fill(scores, texts, rows, record) -> None:
        for row in rows:
            for m in scores:
                scores[m][row] = record["scores"][m]
            if texts is not None:
                texts[row] = record.get("texts") or []

    def _compute(self, masks: Masks, groups: list[list[int]], scores, texts) -> None:
        from tqdm.auto import tqdm

        runner = self.generator if self.requests.generation else self.scorer
        per_pass = runner.masks_per_pass(self.requests)
        if self.backend.size > 1:  # enough chunks to keep every worker busy
            per_pass = max(1, min(per_pass, -(-len(groups) // (2 * self.backend.size))))
        n_groups, lead, base = len(groups), [], None
        if not self.requests.generation:
            base = self._base_mask(masks, groups, per_pass)
            if base is not None:  # the base runs first, alone
                lead = [[groups.pop(next(i for i, rows in enumerate(groups)
                                         if np.array_equal(masks.rows[rows[0]], base)))]]
            # chunks of masks that start at the same layer skip the most
            starts = self.scorer.start_layers(masks[[rows[0] for rows in groups]], base)
            groups = [groups[i] for i in np.argsort(starts, kind="stable")]
        chunks = lead + [groups[start:start + per_pass] for start in range(0, len(groups), per_pass)]
        with tqdm(total=n_groups, desc=f"eval {self.task.name}", unit="mask", disable=not self.progress,
                  leave=False) as bar:
            def done(chunk, chunk_scores, chunk_texts):
                # each chunk reaches the store as it finishes: a killed run keeps every finished chunk
                for j, rows in enumerate(chunk):
                    record = {"scores": {m: v[j].tolist() for m, v in chunk_scores.items()}}
                    if chunk_texts is not None:
                        record["texts"] = chunk_texts[j]
                    self.cache.put(masks.key(rows[0]), int(masks.rows[rows[0]].sum()), record)
                    self._fill(scores, texts, rows, record)
                    self.stats.evaluations += 1
                bar.update(len(chunk))

            with self.scorer.based_on(base):
                self.backend.run(self, [(chunk, masks[[g[0] for g in chunk]]) for chunk in chunks], done)

    def _base_mask(self, masks: Masks, groups: list[list[int]], per_pass: int) -> np.ndarray | None:
        """The mask to score first with its hidden states kept, so that the others start where they part from it
        (`Scorer.based_on`); None where none saves enough (`Scorer.base_plan`), or the chunks run elsewhere
        (another process's scorer would not have the states), or the items are packed (one prefix per item: their
        passes start at the first ablated layer of the chunk). Only up to MAX_PLANNED masks are compared."""
        if self.backend.size > 1 or self.requests.packed or not 1 < len(groups) <= MAX_PLANNED:
            return None
        candidates = masks[[g[0] for g in groups]]
        best = self.scorer.base_plan(candidates, per_pass)
        return None if best is None else candidates.rows[best]

    def score(self, masks: Masks) -> tuple[dict[str, np.ndarray], list[list[str]] | None]:
        """The model's scores under `masks` (no cache): {metric: [n_masks, n_items]}, and generations."""
        if self.requests.generation:
            generated = self.generator.generate(self.requests, masks, self.max_new_tokens)
            return self.task.process_generations(self.items, generated), generated
        logprob, greedy = self.scorer.teacher_forced(self.requests, masks)
        per_item = self.requests.per_item
        return self.task.process_loglikelihoods(self.items, per_item(logprob), per_item(greedy),
                                                self.requests.lengths()), None
