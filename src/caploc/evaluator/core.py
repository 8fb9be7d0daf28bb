"""The one batched evaluator: a task's items under MANY ablation masks.

Every method in caploc calls `Evaluator.evaluate(masks)`; nothing else runs the model on task items. It
composes what to score (`requests`), how to run it (`runner`: batched forward/generate under per-row masks)
and what is already known (`cache`: memory + persistent store); the task turns raw log-likelihoods or
generations into its metrics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from caploc.ablation import component_ablation, heads_to_mask
from caploc.errors import CaplocError, ParameterError
from caploc.evaluator.cache import ScoreCache
from caploc.evaluator.requests import Requests
from caploc.evaluator.runner import EvalStats, Runner
from caploc.models import LoadedModel
from caploc.tasks.base import Item, Task


@dataclass
class EvalResult:
    """Scores of every item under every mask: `scores[metric]` is [n_masks, n_items]."""

    masks: np.ndarray  # bool [n_masks, n_components]
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
                 components: str = "heads", scale: float = 0.0):
        """`components`: what a mask column is (attention heads, or MLP neurons); `scale`: what a masked
        component is multiplied by (0 ablates; above 1 enhances); `batch_tokens`: tokens per forward pass
        (default: from free memory on an accelerator, 8192 on CPUs)."""
        self.lm = lm
        self.task = task
        # what rebuilds this evaluator in a worker process (distributed evaluation)
        self.recipe = {"task": task, "items": list(items), "mode": mode, "batch_tokens": batch_tokens,
                       "reference_items": reference_items, "max_new_tokens": max_new_tokens,
                       "components": components, "scale": scale}
        self.requests = Requests(lm.tokenizer, task, items)
        self.items = self.requests.items
        self.mode = mode
        self.progress = progress
        self.max_new_tokens = max_new_tokens or task.max_new_tokens
        self.components = components
        self.scale = float(scale)
        self.stats = EvalStats()
        self.ablation = component_ablation(lm.model, components, mode)
        self.runner = Runner(lm, self.ablation, self.stats, batch_tokens, self.scale)
        if mode == "mean":
            reference = Requests(lm.tokenizer, task, reference_items or self.items)
            self.ablation.fit_means(lambda setter: self.runner.reference(reference, setter))
        self.task_fingerprint = task.fingerprint(self.items)
        key = {"model": lm.fingerprint, "task": self.task_fingerprint, "mode": self.mode,
               "max_new_tokens": self.max_new_tokens if self.requests.generation else None}
        if components != "heads" or self.scale != 0.0:  # head ablation keeps the keys it always had
            key |= {"components": components, "scale": self.scale}
        self.cache = ScoreCache(key, self.metric_names(), store, self.stats)

    # hooks live only inside each forward pass; closing is kept for callers that manage scope explicitly
    def close(self) -> None:
        pass

    def __enter__(self) -> "Evaluator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def n_heads(self) -> int:
        """Mask width: the number of components (heads, or neurons)."""
        return self.ablation.n_total

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

    def gradients(self, metric: str, ablated=None) -> np.ndarray:
        """[n_items, n_components]: d metric(item) / d multiplier of each component at 1, for metrics that are
        linear in the continuations' log-probabilities (logprob, logprob_all, logit_diff): a first-order
        estimate of every component's ablation effect from one forward + backward pass. `ablated` (component
        indices or a bool vector) holds those components at 0: the estimate on top of that ablation."""
        if not self.task.has_gradient(metric):
            linear = self.task.linear_metrics
            raise ParameterError(f"{{metric}} {metric!r} of task {self.task.name} has no gradient: use one of "
                                 f"{', '.join(linear) or 'none (a generation task)'}", "metric")
        started = time.perf_counter()
        at = None
        if ablated is not None:
            ablated = np.asarray(ablated)
            at = self._as_mask(ablated[None] if ablated.dtype == bool else [ablated.astype(int).tolist()])[0]
        grads = self.runner.sequence_gradients(self.requests, self._metric_weights(metric), at)
        self.stats.seconds += time.perf_counter() - started
        item_of = np.array([seq.item for seq in self.requests.sequences])
        out = np.zeros((len(self.items), grads.shape[1]))
        np.add.at(out, item_of, grads)
        return out

    def _metric_weights(self, metric: str) -> np.ndarray:
        """Per sequence s, d metric(item of s) / d log p(s): the metric is linear in the log-probabilities,
        so the task's own scoring applied to unit log-probabilities gives it."""
        n_seq = len(self.requests.sequences)
        per_item = self.requests.per_item
        no_greedy = [np.zeros_like(x, dtype=bool) for x in per_item(np.zeros((n_seq, n_seq)))]

        def metric_of(logprob: np.ndarray) -> np.ndarray:  # [n_seq, n_seq] -> [n_seq, n_items]
            return self.task.process_loglikelihoods(self.items, per_item(logprob), no_greedy)[metric]

        slopes = metric_of(np.eye(n_seq)) - metric_of(np.zeros((n_seq, n_seq)))
        return slopes[np.arange(n_seq), [seq.item for seq in self.requests.sequences]]

    def baseline(self) -> EvalResult:
        return self.evaluate(torch.zeros(1, self.n_heads, dtype=torch.bool))

    def evaluate(self, masks) -> EvalResult:
        """masks: bool array/tensor [n_masks, n_components], or a list of component-index collections."""
        mask = self._as_mask(masks)
        started = time.perf_counter()
        n_masks = mask.shape[0]
        metrics = self.metric_names()
        scores = {m: np.zeros((n_masks, len(self.items)), dtype=np.float64) for m in metrics}
        texts: list[list[str]] | None = [[] for _ in range(n_masks)] if self.requests.generation else None
        # identical masks in one request are computed once
        todo: dict[bytes, list[int]] = {}
        for row in range(n_masks):
            record = self.cache.get(mask[row].numpy())
            if record is None:
                todo.setdefault(mask[row].numpy().tobytes(), []).append(row)
            else:
                self._fill(scores, texts, [row], record)
        if todo:
            self._compute(mask, todo, scores, texts)
        self.stats.seconds += time.perf_counter() - started
        return EvalResult(masks=mask.numpy(), scores=scores, item_ids=[i.id for i in self.items], texts=texts)

    def _as_mask(self, masks) -> torch.Tensor:
        if isinstance(masks, np.ndarray):
            masks = torch.from_numpy(masks)
        if isinstance(masks, torch.Tensor):
            mask = masks.bool().cpu()
        else:
            mask = heads_to_mask(masks, self.n_heads)
        if mask.dim() != 2 or mask.shape[1] != self.n_heads:
            raise CaplocError(f"masks must be [n_masks, {self.n_heads}], got {tuple(mask.shape)}")
        return mask

    @staticmethod
    def _fill(scores, texts, rows, record) -> None:
        for row in rows:
            for m in scores:
                scores[m][row] = record["scores"][m]
            if texts is not None:
                texts[row] = record.get("texts") or []

    def _compute(self, mask: torch.Tensor, todo: dict[bytes, list[int]], scores, texts) -> None:
        from tqdm.auto import tqdm

        groups = list(todo.values())
        if not self.requests.generation:  # chunks of masks that start at the same layer skip the most
            groups.sort(key=lambda rows: self.runner.first_layer(mask[rows[0]]))
        per_pass = self.runner.masks_per_pass(self.requests)
        workers = self.lm.extra.get("workers")  # a distributed pool (evaluator.distributed) shards the chunks
        if workers is not None:  # enough chunks to keep every worker busy
            per_pass = max(1, min(per_pass, -(-len(groups) // (2 * workers.size))))
        chunks = [groups[start:start + per_pass] for start in range(0, len(groups), per_pass)]
        with tqdm(total=len(groups), desc=f"eval {self.task.name}", unit="mask", disable=not self.progress,
                  leave=False) as bar:
            def done(chunk, chunk_scores, chunk_texts):
                # each chunk reaches the store as it finishes: a killed run keeps every finished chunk
                for j, rows in enumerate(chunk):
                    record = {"scores": {m: v[j].tolist() for m, v in chunk_scores.items()}}
                    if chunk_texts is not None:
                        record["texts"] = chunk_texts[j]
                    self.cache.put(mask[rows[0]].numpy(), record)
                    self._fill(scores, texts, rows, record)
                    self.stats.evaluations += 1
                bar.update(len(chunk))

            if workers is not None:
                workers.run(self, [(chunk, mask[[g[0] for g in chunk]]) for chunk in chunks], done)
            else:
                for chunk in chunks:
                    done(chunk, *self._score(mask[[g[0] for g in chunk]]))

    def _score(self, mask: torch.Tensor) -> tuple[dict[str, np.ndarray], list[list[str]] | None]:
        if self.requests.generation:
            generated = self.runner.generate(self.requests, mask, self.max_new_tokens)
            return self.task.process_generations(self.items, generated), generated
        logprob, greedy = self.runner.teacher_forced(self.requests, mask)
        per_item = self.requests.per_item
        return self.task.process_loglikelihoods(self.items, per_item(logprob), per_item(greedy)), None
