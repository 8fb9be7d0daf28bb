"""Gradients of log-likelihoods with respect to the components' multipliers (attribution patching): one
forward and one backward pass give every component's first-order ablation effect on every sequence, at any
point (no ablation, a set held ablated, or partial multipliers)."""

from __future__ import annotations

import numpy as np
import torch

from caploc.evaluator.batches import pad_batch
from caploc.evaluator.requests import MIN_SHARED_PREFIX, Requests
from caploc.evaluator.runner import ModelRunner
from caploc.evaluator.scoring import ScoredTokens
from caploc.evaluator.shortcuts import shortcut_forward


class GradientRunner(ModelRunner):
    def sequence_gradients(self, requests: Requests, weights: np.ndarray,
                           multipliers: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(gradients [n_sequences, n_components], log-probabilities [n_sequences]): d (weights[s] * log p(
        continuation of sequence s)) / d multiplier of component c, and log p itself, at the components'
        `multipliers` (default every one 1: no ablation; 0 holds a component ablated, and the gradient is then
        the first-order effect of each further ablation on top of that set; values between are partial
        ablations). Each row has its own multipliers, so one backward pass gives every row's gradient
        (attribution patching through the per-row mask mechanism). A prefix shared by several items runs once
        per pass, with multipliers of its own (`_shared_prefix_gradients`); the rows of an item's sequences
        sum to its gradient. Sequences of weight 0 do not run (their log-probability is NaN). Counted as
        three forward passes in the token budget (a backward costs about two)."""
        out = np.zeros((len(requests.sequences), self.ablation.n_total))
        values = np.full(len(requests.sequences), np.nan)
        base = torch.ones(self.ablation.n_total, dtype=torch.float64)
        if multipliers is not None:
            base = torch.as_tensor(np.asarray(multipliers, dtype=np.float64))
        alone = []
        for prefix, members in requests.prefix_groups().items():
            members = [s for s in members if weights[s] != 0]  # sequences the metric does not use never run
            if not members:
                continue
            items = {requests.sequences[s].item for s in members}
            if self.shortcuts.shared_prefix and len(items) > 1 and len(prefix) >= MIN_SHARED_PREFIX:
                self._shared_prefix_gradients(requests, prefix, members, weights, base, out, values)
            else:
                alone += members
        if alone:
            self._whole_row_gradients(requests, alone, weights, base, out, values)
        return out, values

    def _whole_row_gradients(self, requests: Requests, members: list[int], weights: np.ndarray,
                             base: torch.Tensor, out: np.ndarray, values: np.ndarray) -> None:
        """Each sequence a row with its whole prompt."""
        seqs = requests.sequences
        rows = {s: list(seqs[s].prefix) + seqs[s].context + seqs[s].continuation for s in members}
        for chunk in requests.length_chunks(members, self.batch_tokens // 4):  # activations kept for backward
            ids, _ = pad_batch([rows[s] for s in chunk], self.lm.tokenizer.pad_token_id, device=self.device)
            starts = [len(rows[s]) - len(seqs[s].continuation) for s in chunk]
            scales = base.repeat(len(chunk), 1).requires_grad_(True)
            with torch.enable_grad(), self.ablation.applied(scales=scales):
                total, values[chunk] = self._weighted_logprob(ids, [seqs[s] for s in chunk], starts, weights[chunk])
                grad, = torch.autograd.grad(total, scales)
            out[chunk] += grad.double().cpu().numpy()
            self._count_gradient(3 * sum(len(rows[s]) for s in chunk))

    def _shared_prefix_gradients(self, requests: Requests, prefix: tuple[int, ...], members: list[int],
                                 weights: np.ndarray, base: torch.Tensor, out: np.ndarray, values: np.ndarray) -> None:
        """The prefix once per pass, with one multiplier vector of its own, and the members' own tokens as rows
        attending to its K/V (`shortcut_forward`), in chunks. Each chunk's backward stops at the prefix's
        K/V, where the gradients of all chunks add up; one backward through the prefix then gives its
        multipliers' gradient (the prefix runs forward and backward once, not once per chunk: a quarter of
        an MBPP pass on Qwen2.5-Coder-0.5B). Each row's own multipliers give its exact share; the prefix's
        gradient is the sum over the items of their prefix shares, which one backward cannot separate, so it
        is spread evenly over the items (on their first sequence): every item-mean of the gradient is exact,
        and a single item's gradient is exact up to how its prefix share differs from the mean (what a
        bootstrap over items sees of it)."""
        seqs = requests.sequences
        prefix_scales = base[None].clone().requires_grad_(True)
        kv: dict = {}
        with torch.enable_grad():
            with shortcut_forward(self.lm.model, capture=kv), self.ablation.applied(scales=prefix_scales):
                self.lm.model(input_ids=torch.tensor([prefix], device=self.device), use_cache=False,
                              logits_to_keep=1)
        held = {layer: tuple(t.detach().requires_grad_(True) for t in pair) for layer, pair in kv.items()}
        produced = [t for pair in kv.values() for t in pair]
        stops = [t for pair in held.values() for t in pair]
        for chunk in requests.length_chunks(members, (self.batch_tokens - len(prefix)) // 4, shared_prefix=True):
            ids, _ = pad_batch([seqs[s].context + seqs[s].continuation for s in chunk],
                               self.lm.tokenizer.pad_token_id, device=self.device)
            positions = (torch.arange(ids.shape[1], device=self.device) + len(prefix))[None].expand(len(chunk), -1)
            row_scales = base.repeat(len(chunk), 1).requires_grad_(True)
            with torch.enable_grad():
                with shortcut_forward(self.lm.model, prefix=held, rows_per_prefix=len(chunk)), \
                        self.ablation.applied(scales=row_scales):
                    total, values[chunk] = self._weighted_logprob(ids, [seqs[s] for s in chunk],
                                                   [len(seqs[s].context) for s in chunk], weights[chunk],
                                                   position_ids=positions, use_cache=False)
                torch.autograd.backward(total, inputs=[row_scales, *stops])  # adds into stops' .grad
            out[chunk] += row_scales.grad.double().cpu().numpy()
            self._count_gradient(3 * sum(len(seqs[s].context) + len(seqs[s].continuation) for s in chunk))
        used = [(t, stop.grad) for t, stop in zip(produced, stops) if stop.grad is not None]
        prefix_grad, = torch.autograd.grad([t for t, _ in used], prefix_scales, [g for _, g in used])
        first_of_item = {}
        for s in members:
            first_of_item.setdefault(seqs[s].item, s)
        out[list(first_of_item.values())] += prefix_grad.double().cpu().numpy() / len(first_of_item)
        self._count_gradient(3 * len(prefix))

    def _weighted_logprob(self, ids: torch.Tensor, seqs, starts: list[int], weights: np.ndarray,
                          **kwargs) -> tuple[torch.Tensor, np.ndarray]:
        """(sum over rows of weights[r] * log p(continuation r), differentiable; each row's log p), where row
        r's continuation starts at index starts[r] of `ids`; only the positions that predict a continuation
        token are projected on the vocabulary."""
        scored = ScoredTokens(seqs, [start - 1 for start in starts], 1, self.device)
        with scored.applied(self.lm.model):
            logits = self.lm.model(input_ids=ids, logits_to_keep=0, **kwargs).logits
        return scored.weighted_sum(logits, weights)

    def _count_gradient(self, tokens: int) -> None:
        self.stats.tokens += tokens
        self.stats.gradient_tokens += tokens
