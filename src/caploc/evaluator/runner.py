"""Batched forward passes and generation under per-row ablation masks.

Rows of a forward pass are (mask, sequence) pairs, mask-major. For log-likelihood tasks, one teacher-forced
pass per row decides greedy exact match and gives the continuation's log-probability. The few-shot prefix
shared by a group of items is run once per mask, and every row of that mask attends to its K/V without a
copy (`partial`); rows whose masks leave the first layers alone start at the first ablated layer from the
unablated hidden states, computed once per evaluator. Suffixes are RIGHT padded and run without an
attention mask: for a causal model the real tokens never see the pads, so every row is exact and its
layout (positions, padding) is the same under every mask, baseline included (DESIGN.md section 4).
Generation runs caploc's own greedy loop with left padding; all masks of an item chunk share one layout.
"""

from __future__ import annotations

import copy
import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from caploc.ablation import ComponentAblation
from caploc.evaluator.batches import pad_batch
from caploc.evaluator.partial import Support, partial_forward, support
from caploc.evaluator.requests import MIN_SHARED_PREFIX, Requests
from caploc.models import LoadedModel

GENERATE_ROWS = 64  # rows per generate() call: bounded by the KV cache of long generations


@dataclass
class EvalStats:
    evaluations: int = 0  # masks computed by the model (not read from the store)
    reused: int = 0  # masks answered from the persistent store (not this evaluator's own memory)
    tokens: int = 0  # tokens run through the model (rows that start at a later layer count that share)
    gradient_tokens: int = 0  # of which for gradients: a forward + backward counts as three passes
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"evaluations": self.evaluations, "reused": self.reused, "tokens": self.tokens,
                "gradient_tokens": self.gradient_tokens, "seconds": round(self.seconds, 3)}


CPU_BATCH_TOKENS = 8192  # on CPUs the batch is bounded by cache-friendly sizes, not memory
MAX_BATCH_TOKENS = 1 << 18
LAYER_REUSE_BYTES = 1 << 30  # unablated hidden states an evaluator keeps for layer reuse; above this, none


@dataclass
class _Unablated:
    """The unablated model's hidden states entering every decoder layer, for one prefix group: where rows
    whose masks leave the first layers alone start."""

    prefix: list[torch.Tensor] | None  # per layer [1, P, hidden]
    sequences: dict[int, torch.Tensor]  # sequence -> [n_layers, its input length, hidden]

    def rows(self, chunk: list[int], width: int, layer: int) -> torch.Tensor:
        """[len(chunk), width, hidden] entering `layer`, right-padded with zeros (pads are never attended)."""
        first = self.sequences[chunk[0]]
        out = first.new_zeros(len(chunk), width, first.shape[-1])
        for r, s in enumerate(chunk):
            states = self.sequences[s][layer]
            out[r, :states.shape[0]] = states
        return out


def tokens_for_memory(free_bytes: int, config, dtype: torch.dtype) -> int:
    """How many tokens one forward pass may hold in `free_bytes` of device memory: per token, the K/V of every
    layer (kept for the shared-prefix cache and for generation), the residual stream and MLP activations of
    the widest layer twice over (inputs kept while outputs are made), and the fp32 logits of the positions
    scored; half the free memory is left to the allocator's fragmentation and to what grows during a run."""
    width = torch.finfo(dtype).bits // 8
    hidden = getattr(config, "hidden_size", 1024)
    layers = getattr(config, "num_hidden_layers", 24)
    heads = getattr(config, "num_attention_heads", 16)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    intermediate = getattr(config, "intermediate_size", 4 * hidden)
    per_token = (2 * layers * kv_heads * head_dim * width  # KV cache
                 + 2 * (hidden + 2 * intermediate) * width  # activations of the widest layer
                 + getattr(config, "vocab_size", 32000) * 4 // 8)  # logits (about an eighth of positions scored)
    return int(max(1024, min(MAX_BATCH_TOKENS, free_bytes * 0.5 // per_token)))


def default_batch_tokens(lm: LoadedModel) -> int:
    """Tokens per forward pass: from free device memory on an accelerator, else CPU_BATCH_TOKENS."""
    device = next(lm.model.parameters()).device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return tokens_for_memory(free, lm.model.config, lm.dtype)
    return CPU_BATCH_TOKENS


class Runner:
    def __init__(self, lm: LoadedModel, ablation: ComponentAblation, stats: EvalStats,
                 batch_tokens: int | None = None, scale: float = 0.0):
        self.lm = lm
        self.ablation = ablation
        self.stats = stats
        self.batch_tokens = batch_tokens or default_batch_tokens(lm)
        self.scale = float(scale)
        self.device = next(lm.model.parameters()).device
        self._unablated: dict[tuple[int, ...], _Unablated | None] = {}

    @cached_property
    def _cache_name(self) -> str:
        """The KV cache's argument name in this transformers' forward: `cache` (5.x), `past_key_values` before."""
        return "cache" if "cache" in inspect.signature(self.lm.model.forward).parameters else "past_key_values"

    @cached_property
    def partial(self) -> Support:
        """What this model's forward can skip: copies of a shared prefix, layers before the first ablated."""
        return support(self.lm)

    def first_layer(self, mask: torch.Tensor) -> int:
        """The first decoder layer that any row of `mask` ([n_total] or [rows, n_total]) touches; the last
        layer for no ablation (rows must still run one layer to be scored)."""
        site = self.ablation.site
        touched = torch.nonzero(mask.reshape(-1, site.n_total).any(0))
        return int(touched.min()) // site.n_units if len(touched) else site.n_layers - 1

    def _layer_share(self, tokens: int, start: int) -> int:
        """Tokens counted for rows that run only the layers from `start` on."""
        n_layers = self.ablation.site.n_layers
        return tokens * (n_layers - start) // n_layers

    def _applied(self, mask: torch.Tensor):
        """Masked components are zeroed (scale 0) or multiplied by `scale` in the rows of `mask`."""
        if self.scale == 0.0:
            return self.ablation.applied(mask)
        scale = torch.tensor(self.scale, dtype=torch.float64)  # cast to the model's dtype in the hook, not before
        return self.ablation.applied(scales=torch.where(mask.bool(), scale, torch.ones((), dtype=torch.float64)))

    def masks_per_pass(self, requests: Requests) -> int:
        if requests.generation:  # rows = masks x items; keep about GENERATE_ROWS rows per call
            return max(1, GENERATE_ROWS // min(len(requests.items), GENERATE_ROWS))
        n_seq = len(requests.sequences)
        if self.partial.shared_prefix:  # a mask costs its prefixes once and its rows' own tokens
            prefixes = {seq.prefix for seq in requests.sequences}
            per_mask = sum(map(len, prefixes)) + n_seq * requests.row_tokens(range(n_seq), shared_prefix=True)
            return max(1, min(64, self.batch_tokens // per_mask))
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
        groups = requests.prefix_groups()
        prefixed = [(p, m) for p, m in groups.items() if p]
        if len(prefixed) > 1:  # many prefixes (one per multiple-choice item): pack them into shared passes
            for pack in _packs(prefixed, requests):
                logprob, greedy = self._score_packed(requests, pack, mask_dev)
                members = [s for _, group in pack for s in group]
                seq_logprob[:, members] = logprob
                seq_greedy[:, members] = greedy
            groups = {p: m for p, m in groups.items() if not p}
        for prefix, members in groups.items():
            start, unablated = 0, None
            first_layer = self.first_layer(mask)
            if self.partial.layer_reuse and first_layer > 0:
                unablated = self._unablated_states(requests, prefix, members)
                start = first_layer if unablated is not None else 0
            prefix_cache = self._run_prefix(prefix, mask_dev, start, unablated) if prefix else None
            row_tokens = requests.row_tokens(members, shared_prefix=self.partial.shared_prefix)
            per_chunk = max(1, self.batch_tokens // (row_tokens * n_masks))
            for first in range(0, len(members), per_chunk):
                chunk = members[first:first + per_chunk]
                logprob, greedy = self._score_chunk(requests, chunk, len(prefix), prefix_cache, mask_dev, start,
                                                    unablated)
                seq_logprob[:, chunk] = logprob
                seq_greedy[:, chunk] = greedy
        return seq_logprob, seq_greedy

    def _score_packed(self, requests: Requests, pack, mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Several prefix groups in shared passes: their prefixes (LEFT-padded and attention-masked, so every
        suffix starts at the same cache index and sliding-window attention sees true distances) once per
        mask, then every member sequence on its own group's prefix cache. The pack and its padded layout are
        fixed by the items alone, so a sequence is laid out the same way under every mask."""
        pad = self.lm.tokenizer.pad_token_id
        prefixes = [list(p) for p, _ in pack]
        group_of = torch.tensor([g for g, (_, members) in enumerate(pack) for _ in members], device=self.device)
        seqs = [requests.sequences[s] for _, members in pack for s in members]
        pre_ids, pre_real = pad_batch(prefixes, pad, side="left", device=self.device)
        pre_positions = (pre_real.cumsum(1) - 1).clamp_min(0)
        inputs = [seq.context + seq.continuation[:-1] for seq in seqs]
        suf_ids, _ = pad_batch(inputs, pad, device=self.device)
        n_groups, n_seq, width = len(pack), len(seqs), suf_ids.shape[1]
        prefix_len = pre_real.sum(1)
        starts = [len(seq.context) - 1 for seq in seqs]
        attention = torch.cat([pre_real[group_of], torch.ones_like(suf_ids)], dim=1)
        positions = prefix_len[group_of][:, None] + torch.arange(width, device=self.device)[None]
        per_call = max(1, self.batch_tokens // (n_groups * pre_ids.shape[1] + n_seq * width))
        total = np.zeros((mask.shape[0], n_seq))
        greedy = np.zeros((mask.shape[0], n_seq), dtype=bool)
        for m0 in range(0, mask.shape[0], per_call):
            chunk = mask[m0:m0 + per_call]
            c = chunk.shape[0]
            with self._applied(chunk.repeat_interleave(n_groups, dim=0)):  # mask-major rows
                cache = _returned_cache(self.lm.model(
                    input_ids=pre_ids.repeat(c, 1), attention_mask=pre_real.repeat(c, 1),
                    position_ids=pre_positions.repeat(c, 1), use_cache=True, logits_to_keep=1))
            cache.batch_select_indices((torch.arange(c, device=self.device)[:, None] * n_groups
                                        + group_of[None]).reshape(-1))
            scored = _ScoredTokens(seqs, starts, c, self.device)
            with self._applied(chunk.repeat_interleave(n_seq, dim=0)), scored.applied(self.lm.model):
                logits = self.lm.model(input_ids=suf_ids.repeat(c, 1), attention_mask=attention.repeat(c, 1),
                                       position_ids=positions.repeat(c, 1), use_cache=True, logits_to_keep=0,
                                       **{self._cache_name: cache}).logits
            self.stats.tokens += int(pre_real.sum()) * c + sum(len(x) for x in inputs) * c
            total[m0:m0 + c], greedy[m0:m0 + c] = scored.reduce(logits)
        return total, greedy

    def _run_prefix(self, prefix: tuple[int, ...], mask: torch.Tensor, start: int = 0,
                    unablated: _Unablated | None = None):
        """The prefix under every mask: its K/V per layer (from layer `start` on), or a KV cache where the
        model cannot attend to a shared prefix without copies."""
        ids = torch.tensor([prefix], device=self.device).expand(mask.shape[0], -1)
        self.stats.tokens += self._layer_share(ids.numel(), start)
        if not self.partial.shared_prefix:
            with self._applied(mask):
                return _returned_cache(self.lm.model(input_ids=ids, use_cache=True, logits_to_keep=1))
        kv: dict = {}
        start_inputs = unablated.prefix[start].repeat(mask.shape[0], 1, 1) if start else None
        with partial_forward(self.lm.model, start=start, start_inputs=start_inputs, capture=kv), \
                self._applied(mask):
            self.lm.model(input_ids=ids, use_cache=False, logits_to_keep=1)
        return kv

    @torch.no_grad()
    def _unablated_states(self, requests: Requests, prefix: tuple[int, ...], members: list[int]):
        """The unablated hidden states entering every layer for this prefix group (computed once per
        evaluator), or None when they would take more than LAYER_REUSE_BYTES."""
        if prefix in self._unablated:
            return self._unablated[prefix]
        model, config = self.lm.model, self.lm.model.config
        inputs = {s: requests.sequences[s].context + requests.sequences[s].continuation[:-1] for s in members}
        size = (self.ablation.site.n_layers * getattr(config, "hidden_size", 0)
                * next(model.parameters()).dtype.itemsize
                * (len(prefix) + sum(len(x) for x in inputs.values())))
        if size > LAYER_REUSE_BYTES:
            self._unablated[prefix] = None
            return None
        prefix_inputs, prefix_kv = None, None
        if prefix:
            prefix_inputs, prefix_kv = [], {}
            with partial_forward(model, capture=prefix_kv, layer_inputs=prefix_inputs):
                model(input_ids=torch.tensor([prefix], device=self.device), use_cache=False, logits_to_keep=1)
        sequences = {}
        per_chunk = max(1, self.batch_tokens // requests.row_tokens(members, shared_prefix=True))
        for first in range(0, len(members), per_chunk):
            chunk = members[first:first + per_chunk]
            ids, _ = pad_batch([inputs[s] for s in chunk], self.lm.tokenizer.pad_token_id, device=self.device)
            positions = (torch.arange(ids.shape[1], device=self.device) + len(prefix))[None].expand(len(chunk), -1)
            layer_inputs: list = []
            with partial_forward(model, prefix=prefix_kv, rows_per_prefix=len(chunk), layer_inputs=layer_inputs):
                model(input_ids=ids, position_ids=positions, use_cache=False, logits_to_keep=1)
            stacked = torch.stack(layer_inputs, dim=1)  # [rows, n_layers, width, hidden]
            for r, s in enumerate(chunk):
                sequences[s] = stacked[r, :, :len(inputs[s])].clone()
        self.stats.tokens += len(prefix) + sum(len(x) for x in inputs.values())
        self._unablated[prefix] = _Unablated(prefix_inputs, sequences)
        return self._unablated[prefix]

    def _score_chunk(self, requests: Requests, chunk, prefix_len, prefix_cache, mask, start: int = 0,
                     unablated: _Unablated | None = None):
        seqs = [requests.sequences[s] for s in chunk]
        n_masks, n_seq = mask.shape[0], len(seqs)
        inputs = [seq.context + seq.continuation[:-1] for seq in seqs]
        ids, _ = pad_batch(inputs, self.lm.tokenizer.pad_token_id)
        width = ids.shape[1]
        # first position whose logits predict a continuation token, per sequence
        scored = _ScoredTokens(seqs, [len(seq.context) - 1 for seq in seqs], n_masks, self.device)
        rows_ids = ids.to(self.device).repeat(n_masks, 1)  # mask-major rows
        row_mask = mask.repeat_interleave(n_seq, dim=0)
        self.stats.tokens += self._layer_share(sum(len(x) for x in inputs) * n_masks, start)
        if self.partial.shared_prefix:
            positions = None
            if prefix_len:
                positions = (torch.arange(width, device=self.device) + prefix_len)[None].expand(len(rows_ids), -1)
            start_inputs = unablated.rows(chunk, width, start).repeat(n_masks, 1, 1) if start else None
            with partial_forward(self.lm.model, start=start, start_inputs=start_inputs, prefix=prefix_cache,
                                 rows_per_prefix=n_seq), self._applied(row_mask), scored.applied(self.lm.model):
                logits = self.lm.model(input_ids=rows_ids, position_ids=positions, use_cache=False,
                                       logits_to_keep=0).logits
            return scored.reduce(logits)
        kwargs = {}  # the copying way: the prefix cache repeated for every row
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(n_seq)
            kwargs[self._cache_name] = cache
            kwargs["position_ids"] = (torch.arange(width, device=self.device) + prefix_len)[None].expand(
                rows_ids.shape[0], -1)
        with self._applied(row_mask), scored.applied(self.lm.model):
            logits = self.lm.model(input_ids=rows_ids, use_cache=prefix_cache is not None,
                                   logits_to_keep=0, **kwargs).logits
        return scored.reduce(logits)

    # -- gradients with respect to the component multipliers ---------------------------------------------
    def sequence_gradients(self, requests: Requests, weights: np.ndarray,
                           ablated: torch.Tensor | None = None) -> np.ndarray:
        """[n_sequences, n_components]: d (weights[s] * log p(continuation of sequence s)) / d multiplier of
        component c, at every multiplier 1 (no ablation), or with the components in the bool vector `ablated`
        held at 0 (the first-order effect of each further ablation on top of a set already removed). Each row
        has its own multipliers, so one backward pass gives every row's gradient (attribution patching through
        the per-row mask mechanism). A prefix shared by several items runs once per pass, with multipliers of
        its own (`_shared_prefix_gradients`); the rows of an item's sequences sum to its gradient. Counted as
        three forward passes in the token budget (a backward costs about two)."""
        out = np.zeros((len(requests.sequences), self.ablation.n_total))
        base = torch.ones(self.ablation.n_total, dtype=torch.float64)
        if ablated is not None:
            base[ablated.to(torch.bool).cpu()] = 0.0
        alone = []
        for prefix, members in requests.prefix_groups().items():
            members = [s for s in members if weights[s] != 0]  # sequences the metric does not use never run
            if not members:
                continue
            items = {requests.sequences[s].item for s in members}
            if self.partial.shared_prefix and len(items) > 1 and len(prefix) >= MIN_SHARED_PREFIX:
                self._shared_prefix_gradients(requests, prefix, members, weights, base, out)
            else:
                alone += members
        if alone:
            self._whole_row_gradients(requests, alone, weights, base, out)
        return out

    def _whole_row_gradients(self, requests: Requests, members: list[int], weights: np.ndarray,
                             base: torch.Tensor, out: np.ndarray) -> None:
        """Each sequence a row with its whole prompt."""
        seqs = requests.sequences
        rows = {s: list(seqs[s].prefix) + seqs[s].context + seqs[s].continuation for s in members}
        per_chunk = max(1, self.batch_tokens // (4 * max(len(r) for r in rows.values())))  # kept for backward
        for first in range(0, len(members), per_chunk):
            chunk = members[first:first + per_chunk]
            ids, _ = pad_batch([rows[s] for s in chunk], self.lm.tokenizer.pad_token_id, device=self.device)
            starts = [len(rows[s]) - len(seqs[s].continuation) for s in chunk]
            scales = base.repeat(len(chunk), 1).requires_grad_(True)
            with torch.enable_grad(), self.ablation.applied(scales=scales):
                total = self._weighted_logprob(ids, [seqs[s] for s in chunk], starts, weights[chunk])
                grad, = torch.autograd.grad(total, scales)
            out[chunk] += grad.double().cpu().numpy()
            self._count_gradient(3 * sum(len(rows[s]) for s in chunk))

    def _shared_prefix_gradients(self, requests: Requests, prefix: tuple[int, ...], members: list[int],
                                 weights: np.ndarray, base: torch.Tensor, out: np.ndarray) -> None:
        """The prefix once per pass, with one multiplier vector of its own, and the members' own tokens as rows
        attending to its K/V (`partial`). Each row's own multipliers give its exact share; the prefix's
        gradient is the sum over the pass's items of their prefix shares, which one backward cannot separate,
        so it is spread evenly over those items (on their first sequence in the pass): every item-mean of
        the gradient is exact, and a single item's gradient is exact up to how its prefix share differs
        from the pass's mean (what a bootstrap over items sees of it)."""
        seqs = requests.sequences
        width = max(len(seqs[s].context) + len(seqs[s].continuation) for s in members)
        per_chunk = max(1, (self.batch_tokens - len(prefix)) // (4 * width))
        for first in range(0, len(members), per_chunk):
            chunk = members[first:first + per_chunk]
            ids, _ = pad_batch([seqs[s].context + seqs[s].continuation for s in chunk],
                               self.lm.tokenizer.pad_token_id, device=self.device)
            positions = (torch.arange(ids.shape[1], device=self.device) + len(prefix))[None].expand(len(chunk), -1)
            prefix_scales = base[None].clone().requires_grad_(True)
            row_scales = base.repeat(len(chunk), 1).requires_grad_(True)
            kv: dict = {}
            with torch.enable_grad():
                with partial_forward(self.lm.model, capture=kv), self.ablation.applied(scales=prefix_scales):
                    self.lm.model(input_ids=torch.tensor([prefix], device=self.device), use_cache=False,
                                  logits_to_keep=1)
                with partial_forward(self.lm.model, prefix=kv, rows_per_prefix=len(chunk)), \
                        self.ablation.applied(scales=row_scales):
                    total = self._weighted_logprob(ids, [seqs[s] for s in chunk],
                                                   [len(seqs[s].context) for s in chunk], weights[chunk],
                                                   position_ids=positions, use_cache=False)
                row_grad, prefix_grad = torch.autograd.grad(total, [row_scales, prefix_scales])
            out[chunk] += row_grad.double().cpu().numpy()
            first_of_item = {}
            for s in chunk:
                first_of_item.setdefault(seqs[s].item, s)
            out[list(first_of_item.values())] += prefix_grad.double().cpu().numpy() / len(first_of_item)
            self._count_gradient(3 * (len(prefix) + sum(len(seqs[s].context) + len(seqs[s].continuation)
                                                        for s in chunk)))

    def _weighted_logprob(self, ids: torch.Tensor, seqs, starts: list[int], weights: np.ndarray,
                          **kwargs) -> torch.Tensor:
        """sum over rows of weights[r] * log p(continuation r), where row r's continuation starts at index
        starts[r] of `ids`; only the positions that predict a continuation token are projected on the
        vocabulary."""
        scored = _ScoredTokens(seqs, [start - 1 for start in starts], 1, self.device)
        with scored.applied(self.lm.model):
            logits = self.lm.model(input_ids=ids, logits_to_keep=0, **kwargs).logits
        return scored.weighted_sum(logits, weights)

    def _count_gradient(self, tokens: int) -> None:
        self.stats.tokens += tokens
        self.stats.gradient_tokens += tokens

    # -- generation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, requests: Requests, mask: torch.Tensor, max_new_tokens: int) -> list[list[str]]:
        """What the model writes for every item under every mask, cut at the task's stop strings:
        texts[m][i]. Items that share a few-shot prefix share its computation: the prefix runs once per mask
        and its KV cache is copied to the rows of every item (the items' own tokens follow it, padded
        between prefix and item so that positions are the unpadded ones)."""
        tok = self.lm.tokenizer
        task = requests.task
        n_masks, items = mask.shape[0], requests.items
        per_chunk = max(1, min(len(items), GENERATE_ROWS // n_masks))
        texts = [[""] * len(items) for _ in range(n_masks)]
        prompts = requests.prompts
        gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        if task.stop:
            gen_kwargs.update(stop_strings=list(task.stop), tokenizer=tok)
        for prefix, members in requests.generation_groups:
            for start in range(0, len(members), per_chunk):
                idx = members[start:start + per_chunk]
                new = self._generate_rows(mask, [prompts[i] for i in idx], len(prefix), gen_kwargs)
                decoded = tok.batch_decode(new, skip_special_tokens=True)
                for m in range(n_masks):
                    for r, i in enumerate(idx):
                        texts[m][i] = task.cut_at_stop(decoded[m * len(idx) + r])
        return texts

    def _generate_rows(self, mask: torch.Tensor, prompts: list[list[int]], shared: int,
                       gen_kwargs) -> list[list[int]]:
        """Greedy continuations of `prompts` under every mask (rows mask-major); the first `shared` tokens,
        common to every prompt, are computed once per mask."""
        n_masks, n = mask.shape[0], len(prompts)
        cache = None
        if shared:
            prefix = torch.tensor([prompts[0][:shared]], device=self.device).repeat(n_masks, 1)
            with self._applied(mask.to(self.device)):
                cache = _returned_cache(self.lm.model(input_ids=prefix, use_cache=True, logits_to_keep=1))
            cache.batch_repeat_interleave(n)
            self.stats.tokens += shared * n_masks
            suffix, suffix_attn = pad_batch([p[shared:] for p in prompts], gen_kwargs["pad_token_id"], side="left")
            ids = torch.cat([prefix[:1].cpu().repeat(n, 1), suffix], dim=1)  # padding sits between prefix and item
            attn = torch.cat([torch.ones(n, shared, dtype=suffix_attn.dtype), suffix_attn], dim=1)
        else:
            ids, attn = pad_batch(prompts, gen_kwargs["pad_token_id"], side="left")
        return self._greedy(ids.repeat(n_masks, 1).to(self.device), attn.repeat(n_masks, 1).to(self.device),
                            mask.to(self.device).repeat_interleave(n, dim=0), gen_kwargs, cache)

    def _greedy(self, ids: torch.Tensor, attn: torch.Tensor, row_mask: torch.Tensor, gen_kwargs: dict,
                cache=None) -> list[list[int]]:
        """Greedy decoding, row by row exact, that drops each row from the batch as soon as it is finished
        (end of sequence, or one of the task's stop strings written), together with its KV cache rows and its
        row of the ablation mask, instead of running every row to max_new_tokens as `generate()` does.
        `cache` holds the K/V of the first positions of `ids` (a shared prefix), which are then not rerun."""
        tok, pad = self.lm.tokenizer, gen_kwargs["pad_token_id"]
        stops = list(gen_kwargs.get("stop_strings") or ())
        eos = self.lm.model.generation_config.eos_token_id
        eos = set([eos] if isinstance(eos, int) else (eos or []))
        n_rows = ids.shape[0]
        written: list[list[int]] = [[] for _ in range(n_rows)]
        alive = torch.arange(n_rows, device=ids.device)
        positions = (attn.long().cumsum(-1) - 1).clamp(min=0)
        start = cache.get_seq_length() if cache is not None else 0
        step_ids, step_pos = ids[:, start:], positions[:, start:]
        self.stats.tokens += int(attn[:, start:].sum())
        for _ in range(gen_kwargs["max_new_tokens"]):
            with self._applied(row_mask[alive]):
                out = self.lm.model(input_ids=step_ids, attention_mask=attn, position_ids=step_pos,
                                    use_cache=True, logits_to_keep=1, **{self._cache_name: cache})
            cache = _returned_cache(out)
            next_ids = out.logits[:, -1].argmax(-1)
            self.stats.tokens += len(alive)
            keep = []
            for j, (row, token) in enumerate(zip(alive.tolist(), next_ids.tolist())):
                written[row].append(token)
                # a stop string is caught the step it is completed, so the last few tokens are enough to look at
                finished = token in eos or any(s in tok.decode(written[row][-16:], skip_special_tokens=True)
                                               for s in stops)
                if not finished:
                    keep.append(j)
            if not keep:
                break
            if len(keep) < len(alive):
                index = torch.tensor(keep, device=ids.device)
                cache.batch_select_indices(index)
                alive, attn, next_ids = alive[index], attn[index], next_ids[index]
                positions = positions[index]
            attn = torch.cat([attn, attn.new_ones(len(alive), 1)], dim=1)
            positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
            step_ids, step_pos = next_ids[:, None], positions[:, -1:]
        return [[t for t in row if t != pad] for row in written]

    # -- mean-ablation reference -----------------------------------------------------------------------
    @torch.no_grad()
    def reference(self, requests: Requests, set_weights) -> None:
        """Run the unablated model over the items' prompts, marking real tokens for mean fitting."""
        prompts = requests.prompts
        for start in range(0, len(prompts), 16):
            ids, real = pad_batch(prompts[start:start + 16], self.lm.tokenizer.pad_token_id)
            set_weights(real.float())  # right padding, pads weighted 0
            self.lm.model(input_ids=ids.to(self.device), logits_to_keep=1)


def _returned_cache(output):
    return output["cache"] if "cache" in output else output.past_key_values


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax in fp32 for half-precision models, in the model's own precision above that."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


NORMALISER_ROWS = 32  # scored positions whose fp32 logits are made at a time: a block that stays in cache is ~4x
# faster than one pass over all of them (the normaliser is memory-bound)


class _ScoredTokens:
    """The (row, position) pairs of a pass whose logits predict a continuation token, rows being n_masks x
    `seqs` (mask-major) and starts[r] the position of sequence r predicting its first continuation token.
    Inside `applied`, the model's output embedding sees the hidden states at those pairs only, so the
    vocabulary projection and the log-normaliser run on the tokens scored and no others (a shared range of
    kept positions cost ~2x more on arithmetic, where contexts differ in length); any elementwise logit
    post-processing of the model (Gemma 2's softcapping) still applies."""

    def __init__(self, seqs, starts: list[int], n_masks: int, device):
        lengths = torch.tensor([len(seq.continuation) for seq in seqs])
        seq_of = torch.repeat_interleave(torch.arange(len(seqs)), lengths)
        offset = torch.arange(int(lengths.sum())) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
        base_positions = torch.tensor(starts)[seq_of] + offset
        base_targets = torch.tensor([t for seq in seqs for t in seq.continuation])
        self.n_masks, self.n_seq = n_masks, len(seqs)
        masks = torch.arange(n_masks).repeat_interleave(len(base_targets))
        self.rows = (masks * len(seqs) + seq_of.repeat(n_masks)).to(device)
        self.positions = base_positions.repeat(n_masks).to(device)
        self.targets = base_targets.repeat(n_masks).to(device)
        self.gathered = False

    @contextmanager
    def applied(self, model):
        head = model.get_output_embeddings()
        if head is None:  # no output-embedding module to hook: the logits are gathered afterwards
            yield
            return

        def gather(module, args):
            return (args[0][self.rows, self.positions][None],) + tuple(args[1:])

        handle = head.register_forward_pre_hook(gather)
        self.gathered = True
        try:
            yield
        finally:
            handle.remove()

    def _token_logprobs(self, logits: torch.Tensor):
        """Per scored token: log p(target) and whether it is the argmax."""
        logits = logits[0] if self.gathered else logits[self.rows, self.positions]
        logprobs, argmax_ok = [], []
        for first in range(0, len(self.targets), NORMALISER_ROWS):
            block = _at_least_fp32(logits[first:first + NORMALISER_ROWS])
            targets = self.targets[first:first + NORMALISER_ROWS]
            picked = block.gather(-1, targets[:, None]).squeeze(-1)
            logprobs.append(picked - torch.logsumexp(block, dim=-1))
            argmax_ok.append(block.argmax(-1) == targets)
        return torch.cat(logprobs), torch.cat(argmax_ok)

    def reduce(self, logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Each sequence's continuation log-probability and whether greedy decoding reproduces it:
        [n_masks, n_seq]. The target's logit minus the log-normaliser: no log-softmax is materialised."""
        logprob, ok = self._token_logprobs(logits)
        n_rows = self.n_masks * self.n_seq
        total = torch.zeros(n_rows, dtype=torch.float64, device=logprob.device).index_add_(0, self.rows,
                                                                                          logprob.double())
        wrong = torch.zeros(n_rows, device=logprob.device).index_add_(0, self.rows, (~ok).float())
        shape = (self.n_masks, self.n_seq)
        return total.view(shape).cpu().numpy(), (wrong == 0).view(shape).cpu().numpy()

    def weighted_sum(self, logits: torch.Tensor, weights: np.ndarray) -> torch.Tensor:
        """sum over rows r of weights[r] * log p(continuation r), differentiable."""
        logprob, _ = self._token_logprobs(logits)
        per_token = torch.as_tensor(np.asarray(weights, dtype=np.float64), device=logprob.device)[
            self.rows % self.n_seq].to(logprob.dtype)
        return (per_token * logprob).sum()


PACK_TOKENS = 2048  # tokens of one mask's rows in a pack of prefix groups


def _packs(groups, requests: Requests) -> list[list]:
    """Consecutive prefix groups packed up to about PACK_TOKENS per mask (prefixes and member suffixes
    padded to the pack's longest): a layout that depends on the items only."""
    packs, current = [], []
    for prefix, members in groups:
        trial = current + [(prefix, members)]
        longest_prefix = max(len(p) for p, _ in trial)
        longest_suffix = max(len(requests.sequences[s].context) + len(requests.sequences[s].continuation) - 1
                             for _, ms in trial for s in ms)
        size = len(trial) * longest_prefix + sum(len(ms) for _, ms in trial) * longest_suffix
        if current and size > PACK_TOKENS:
            packs.append(current)
            current = [(prefix, members)]
        else:
            current = trial
    if current:
        packs.append(current)
    return packs
