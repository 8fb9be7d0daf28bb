"""Batched forward passes and generation under per-row ablation masks.

Rows of a forward pass are (mask, sequence) pairs, mask-major. For log-likelihood tasks, one teacher-forced
pass per row decides greedy exact match and gives the continuation's log-probability. The few-shot prefix
shared by a group of items is run once per mask and its KV cache reused for all of that mask's items.
Suffixes are RIGHT padded and run without an attention mask: for a causal model the real tokens never see
the pads, so every row is exact and its layout (positions, padding) is the same under every mask, baseline
included (DESIGN.md section 4). Generation uses `generate()` with left padding; all masks of an item chunk
share one layout.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from caploc.ablation import ComponentAblation
from caploc.evaluator.batches import pad_batch
from caploc.evaluator.requests import Requests
from caploc.models import LoadedModel

GENERATE_ROWS = 64  # rows per generate() call: bounded by the KV cache of long generations


@dataclass
class EvalStats:
    evaluations: int = 0  # masks computed by the model (not read from the store)
    reused: int = 0  # masks answered from the persistent store (not this evaluator's own memory)
    tokens: int = 0  # tokens run through the model
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"evaluations": self.evaluations, "reused": self.reused, "tokens": self.tokens,
                "seconds": round(self.seconds, 3)}


class Runner:
    def __init__(self, lm: LoadedModel, ablation: ComponentAblation, stats: EvalStats, batch_tokens: int = 8192,
                 scale: float = 0.0):
        self.lm = lm
        self.ablation = ablation
        self.stats = stats
        self.batch_tokens = batch_tokens
        self.scale = float(scale)
        self.device = next(lm.model.parameters()).device

    def _applied(self, mask: torch.Tensor):
        """Masked components are zeroed (scale 0) or multiplied by `scale` in the rows of `mask`."""
        if self.scale == 0.0:
            return self.ablation.applied(mask)
        return self.ablation.applied(scales=torch.where(mask.bool(), self.scale, 1.0))

    def masks_per_pass(self, requests: Requests) -> int:
        if requests.generation:  # rows = masks x items; keep about GENERATE_ROWS rows per call
            return max(1, GENERATE_ROWS // min(len(requests.items), GENERATE_ROWS))
        n_seq = len(requests.sequences)
        rows = max(1, self.batch_tokens // requests.row_tokens(range(n_seq)))
        return max(1, min(64, rows // max(1, min(n_seq, rows))))

    # -- teacher-forced scoring -------------------------------------------------------------------------
    @torch.no_grad()
    def teacher_forced(self, requests: Requests, mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(log-probability, greedy exact match) of every sequence under every mask: [n_masks, n_sequences]."""
        n_masks = mask.shape[0]
        n_seq = len(requests.sequences)
        seq_logprob = np.zeros((n_masks, n_seq))
        seq_greedy = np.zeros((n_masks, n_seq), dtype=bool)
        mask_dev = mask.to(self.device)
        for prefix, members in requests.prefix_groups().items():
            prefix_cache = self._run_prefix(prefix, mask_dev) if prefix else None
            per_chunk = max(1, self.batch_tokens // (requests.row_tokens(members) * n_masks))
            for start in range(0, len(members), per_chunk):
                chunk = members[start:start + per_chunk]
                logprob, greedy = self._score_chunk(requests, chunk, len(prefix), prefix_cache, mask_dev)
                seq_logprob[:, chunk] = logprob
                seq_greedy[:, chunk] = greedy
        return seq_logprob, seq_greedy

    def _run_prefix(self, prefix: tuple[int, ...], mask: torch.Tensor):
        ids = torch.tensor([prefix], device=self.device).expand(mask.shape[0], -1)
        with self._applied(mask):
            out = self.lm.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        self.stats.tokens += ids.numel()
        return out.past_key_values

    def _score_chunk(self, requests: Requests, chunk, prefix_len, prefix_cache, mask):
        seqs = [requests.sequences[s] for s in chunk]
        n_masks, n_seq = mask.shape[0], len(seqs)
        inputs = [seq.context + seq.continuation[:-1] for seq in seqs]
        ids, _ = pad_batch(inputs, self.lm.tokenizer.pad_token_id)
        width = ids.shape[1]
        # first position whose logits predict a continuation token, per sequence
        starts = [len(seq.context) - 1 for seq in seqs]
        ends = [len(seq.context) + len(seq.continuation) - 1 for seq in seqs]
        lo, hi = min(starts), max(ends)
        keep = torch.arange(lo, hi, device=self.device)
        rows_ids = ids.to(self.device).repeat(n_masks, 1)  # mask-major rows
        row_mask = mask.repeat_interleave(n_seq, dim=0)
        kwargs = {}
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(n_seq)
            kwargs["past_key_values"] = cache
            kwargs["position_ids"] = (torch.arange(width, device=self.device) + prefix_len)[None].expand(
                rows_ids.shape[0], -1)
        with self._applied(row_mask):
            logits = self.lm.model(input_ids=rows_ids, use_cache=prefix_cache is not None,
                                   logits_to_keep=keep, **kwargs).logits
        self.stats.tokens += sum(len(x) for x in inputs) * n_masks
        logprobs = torch.log_softmax(logits.float(), dim=-1).view(n_masks, n_seq, len(keep), -1)
        argmax = logits.argmax(dim=-1).view(n_masks, n_seq, len(keep))
        total = np.zeros((n_masks, n_seq))
        greedy = np.ones((n_masks, n_seq), dtype=bool)
        for r, seq in enumerate(seqs):
            pos = torch.arange(starts[r] - lo, ends[r] - lo, device=self.device)
            target = torch.tensor(seq.continuation, device=self.device)
            lp = logprobs[:, r, pos, :].gather(-1, target[None, :, None].expand(n_masks, -1, 1)).squeeze(-1)
            total[:, r] = lp.double().sum(-1).cpu().numpy()
            greedy[:, r] = (argmax[:, r, pos] == target[None]).all(-1).cpu().numpy()
        return total, greedy

    # -- gradients with respect to the component multipliers ---------------------------------------------
    def sequence_gradients(self, requests: Requests) -> np.ndarray:
        """[n_sequences, n_components]: d log p(continuation of sequence s) / d multiplier of component c, at
        every multiplier 1 (no ablation). Each sequence is a row with its own multipliers, so one backward
        pass gives every row's gradient (attribution patching through the per-row mask mechanism). Counted
        as three forward passes in the token budget (a backward costs about two)."""
        seqs = requests.sequences
        out = np.zeros((len(seqs), self.ablation.n_total))
        rows = [list(s.prefix) + s.context + s.continuation for s in seqs]
        per_chunk = max(1, self.batch_tokens // (4 * max(len(r) for r in rows)))  # activations kept for backward
        for start in range(0, len(rows), per_chunk):
            chunk = list(range(start, min(len(rows), start + per_chunk)))
            ids, _ = pad_batch([rows[s] for s in chunk], self.lm.tokenizer.pad_token_id, device=self.device)
            starts = [len(rows[s]) - len(seqs[s].continuation) for s in chunk]
            lo, hi = min(starts) - 1, max(len(rows[s]) for s in chunk) - 1
            scales = torch.ones(len(chunk), self.ablation.n_total, requires_grad=True)
            with torch.enable_grad(), self.ablation.applied(scales=scales):
                logits = self.lm.model(input_ids=ids, logits_to_keep=torch.arange(lo, hi, device=self.device)).logits
                logprobs = torch.log_softmax(logits.float(), dim=-1)
                total = 0
                for r, s in enumerate(chunk):
                    target = torch.tensor(seqs[s].continuation, device=self.device)
                    pos = torch.arange(starts[r] - 1 - lo, starts[r] - 1 - lo + len(target), device=self.device)
                    total = total + logprobs[r, pos, target].sum()
                grad, = torch.autograd.grad(total, scales)
            out[chunk] = grad.double().cpu().numpy()
            self.stats.tokens += 3 * sum(len(rows[s]) for s in chunk)
        return out

    # -- generation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, requests: Requests, mask: torch.Tensor, max_new_tokens: int) -> list[list[str]]:
        """What the model writes for every item under every mask, cut at the task's stop strings:
        texts[m][i]."""
        tok = self.lm.tokenizer
        task = requests.task
        n_masks, items = mask.shape[0], requests.items
        per_chunk = max(1, min(len(items), GENERATE_ROWS // n_masks))
        texts = [[""] * len(items) for _ in range(n_masks)]
        prompts = [requests.prompt_ids(item) for item in items]
        pad = tok.pad_token_id
        for start in range(0, len(items), per_chunk):
            idx = list(range(start, min(len(items), start + per_chunk)))
            ids, attn = pad_batch([prompts[i] for i in idx], pad, side="left")
            width = ids.shape[1]
            rows_ids = ids.repeat(n_masks, 1).to(self.device)
            rows_attn = attn.repeat(n_masks, 1).to(self.device)
            gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            if task.stop:
                gen_kwargs.update(stop_strings=list(task.stop), tokenizer=tok)
            with self._applied(mask.to(self.device).repeat_interleave(len(idx), dim=0)):
                out = self.lm.model.generate(input_ids=rows_ids, attention_mask=rows_attn, **gen_kwargs)
            new = out[:, width:]
            self.stats.tokens += int(rows_attn.sum()) + int((new != pad).sum())
            decoded = tok.batch_decode(new, skip_special_tokens=True)
            for m in range(n_masks):
                for r, i in enumerate(idx):
                    texts[m][i] = task.cut_at_stop(decoded[m * len(idx) + r])
        return texts

    # -- mean-ablation reference -----------------------------------------------------------------------
    @torch.no_grad()
    def reference(self, requests: Requests, set_weights) -> None:
        """Run the unablated model over the items' prompts, marking real tokens for mean fitting."""
        prompts = [requests.prompt_ids(item) for item in requests.items]
        for start in range(0, len(prompts), 16):
            ids, real = pad_batch(prompts[start:start + 16], self.lm.tokenizer.pad_token_id)
            set_weights(real.float())  # right padding, pads weighted 0
            self.lm.model(input_ids=ids.to(self.device), logits_to_keep=1)
