"""Teacher-forced scoring under ablation masks: per (mask, sequence), the continuation's log-probability and
whether greedy decoding reproduces it, from one forward pass.

The few-shot prefix shared by a group of items is run once per mask, and every row of that mask attends to its
K/V without a copy (`shortcuts`); rows whose masks leave the first layers alone start at the first ablated
layer from the unablated hidden states, computed once per evaluator; and when an evaluation's masks share
their first layers with one of them (a greedy round's candidates all hold the set chosen so far), that one runs
first with its hidden states recorded, and the others start where they part from it (`based_on`). Suffixes are
RIGHT padded and run without an attention mask: for a causal model the real tokens never see the pads, so every
row is exact and its layout (positions, padding) is the same under every mask, baseline included (right padding
is exact; left padding in bf16 moves a row's logits by as much as one head's effect).
"""

from __future__ import annotations

import copy
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers.cache_utils import DynamicLayer

from caploc.evaluator.batches import pad_batch
from caploc.evaluator.requests import CHUNK_OVERHEAD, Requests
from caploc.evaluator.runner import ModelRunner, returned_cache
from caploc.evaluator.shortcuts import shortcut_forward
from caploc.hooks import gathered_output_positions, recorded_layer_inputs, skipped_layers
from caploc.masks import Masks

LAYER_REUSE_BYTES = 1 << 30  # unablated hidden states an evaluator keeps for layer reuse; above this, none
# layer passes a base mask must save where each mask has a pass of its own (it costs only a copy of its states).
# On GSM8K, 1.5B, round 4's candidates part from the best base 25 layer passes later in all: about 50 s at 2 s a
# layer, which a whole mask's 28 as the bar had left
BASE_MIN_LAYERS = 2


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



@dataclass
class _Base:
    """A mask whose hidden states are kept while an evaluation runs (`Scorer.based_on`): rows of masks that
    agree with it on the first layers start where they part from it. `states` is per prefix group, filled when
    the mask itself is scored."""

    mask: np.ndarray  # bool [n_total]
    states: dict = field(default_factory=dict)  # prefix -> _Unablated under this mask


@dataclass
class _PackLayout:
    """A pack's padded layout, the same under every mask: its prefixes left-padded [n_groups, P], its member
    sequences' own tokens right-padded [n_seq, width] after their group's prefix."""

    seqs: list
    starts: list[int]  # per sequence, the position predicting its first continuation token
    group_of: torch.Tensor  # per sequence, its group
    pre_ids: torch.Tensor
    pre_real: torch.Tensor
    pre_positions: torch.Tensor
    suf_ids: torch.Tensor
    attention: torch.Tensor  # per sequence [its prefix's real tokens | its own]
    positions: torch.Tensor
    real_tokens: int  # tokens a mask computes (padding aside)

    @classmethod
    def of(cls, requests: Requests, pack, pad: int, device) -> _PackLayout:
        group_of = torch.tensor([g for g, (_, members) in enumerate(pack) for _ in members], device=device)
        seqs = [requests.sequences[s] for _, members in pack for s in members]
        pre_ids, pre_real = pad_batch([list(p) for p, _ in pack], pad, side="left", device=device)
        inputs = [seq.context + seq.continuation[:-1] for seq in seqs]
        suf_ids, _ = pad_batch(inputs, pad, device=device)
        prefix_len = pre_real.sum(1)
        return cls(seqs=seqs, starts=[len(seq.context) - 1 for seq in seqs], group_of=group_of,
                   pre_ids=pre_ids, pre_real=pre_real, pre_positions=(pre_real.cumsum(1) - 1).clamp_min(0),
                   suf_ids=suf_ids, attention=torch.cat([pre_real[group_of], torch.ones_like(suf_ids)], dim=1),
                   positions=prefix_len[group_of][:, None] + torch.arange(suf_ids.shape[1], device=device)[None],
                   real_tokens=int(pre_real.sum()) + sum(map(len, inputs)))

    @property
    def n_groups(self) -> int:
        return self.pre_ids.shape[0]

    @property
    def n_seq(self) -> int:
        return len(self.seqs)

    @property
    def padded_tokens(self) -> int:
        return self.pre_ids.numel() + self.suf_ids.numel()


@dataclass
class _UnablatedPack:
    """A pack's unablated states: the hidden states entering every layer, for its prefix rows [n_groups, P,
    hidden] and its sequences' rows [n_seq, width, hidden], and every layer's prefix K/V."""

    prefix: list
    suffix: list
    kv: list
    plain: bool = True  # the model's cache is plain full attention: K/V can be handed back


class Scorer(ModelRunner):
    """Teacher-forced passes; keeps the unablated states of each prefix group and each pack for layer reuse."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._unablated: dict[tuple[int, ...], _Unablated | None] = {}
        self._unablated_packs: dict[tuple, _UnablatedPack | None] = {}
        self._pack_bytes = 0  # what the packs' unablated states take
        self._base: _Base | None = None

    def masks_per_pass(self, requests: Requests) -> int:
        n_seq = len(requests.sequences)
        if self.shortcuts.shared_prefix:  # a mask costs its prefixes once and its rows' own tokens
            prefixes = {seq.prefix for seq in requests.sequences}
            per_mask = sum(map(len, prefixes)) + n_seq * requests.row_tokens(range(n_seq), shared_prefix=True)
            return max(1, min(64, self.batch_tokens // per_mask))
        rows = max(1, self.batch_tokens // requests.row_tokens(range(n_seq)))
        return max(1, min(64, rows // max(1, min(n_seq, rows))))

    @torch.no_grad()
    def teacher_forced(self, requests: Requests, masks: Masks) -> tuple[np.ndarray, np.ndarray]:
        """(log-probability, greedy exact match) of every sequence under every mask: [n_masks, n_sequences]."""
        n_masks = len(masks)
        n_seq = len(requests.sequences)
        seq_logprob = np.zeros((n_masks, n_seq))
        seq_greedy = np.zeros((n_masks, n_seq), dtype=bool)
        mask_dev = masks.tensor(self.device)
        groups = requests.prefix_groups()
        prefixed = [(p, m) for p, m in groups.items() if p]
        if requests.packed:  # many prefixes (one per multiple-choice item): pack them into shared passes
            start = self.first_layer(masks) if self.shortcuts.layer_reuse else 0
            for pack in _packs(prefixed, requests):
                logprob, greedy = self._score_packed(requests, pack, mask_dev, start)
                members = [s for _, group in pack for s in group]
                seq_logprob[:, members] = logprob
                seq_greedy[:, members] = greedy
            groups = {p: m for p, m in groups.items() if not p}
        for prefix, members in groups.items():
            start, sources = self._sources(requests, prefix, members, masks)
            record = self._recording(requests, prefix, members, masks)
            prefix_cache = self._run_prefix(prefix, mask_dev, start, sources, record) if prefix else None
            for chunk in requests.length_chunks(members, self.batch_tokens // n_masks,
                                                self.shortcuts.shared_prefix):
                logprob, greedy = self._score_chunk(requests, chunk, len(prefix), prefix_cache, mask_dev, start,
                                                    sources, record)
                seq_logprob[:, chunk] = logprob
                seq_greedy[:, chunk] = greedy
            if record is not None:
                self._base.states[prefix] = record
        return seq_logprob, seq_greedy

    # -- where rows start ----------------------------------------------------------------------------------
    def _first_layers(self, masks: Masks) -> np.ndarray:
        return masks.first_layers(self.ablation.site.n_units, self.ablation.site.n_layers)

    def _parting_layers(self, masks: Masks, other: np.ndarray) -> np.ndarray:
        return masks.parting_layers(other, self.ablation.site.n_units, self.ablation.site.n_layers)

    def _sources(self, requests: Requests, prefix: tuple[int, ...], members: list[int],
                 masks: Masks) -> tuple[int, list | None]:
        """The layer this prefix group's rows start at under `masks`, and per mask the hidden states they
        start from: the unablated model's (layers before its first ablated one are untouched) or, where it
        parts from the base mask later than that, the base's."""
        if not self.shortcuts.layer_reuse:
            return 0, None
        base = self._base.states.get(prefix) if self._base is not None else None
        first = self._first_layers(masks)
        starts = first if base is None else self.start_layers(masks, self._base.mask)
        from_base = starts > first
        start = int(starts.min())
        if start == 0:
            return 0, None
        unablated = self._unablated_states(requests, prefix, members)
        if unablated is None:
            return 0, None
        return start, [base if b else unablated for b in from_base]

    def _recording(self, requests: Requests, prefix: tuple[int, ...], members: list[int],
                   masks: Masks) -> _Unablated | None:
        """The states to fill while the base mask is scored alone (None when `masks` is not it, or its states
        would take more than LAYER_REUSE_BYTES): every layer's inputs, those below where its rows start from
        the states they start from."""
        if (self._base is None or len(masks) != 1 or not self.shortcuts.layer_reuse
                or not np.array_equal(masks.rows[0], self._base.mask)):
            return None
        return _Unablated([], {}) if self._group_bytes(requests, prefix, members) <= LAYER_REUSE_BYTES else None

    @contextmanager
    def based_on(self, mask: np.ndarray | None):
        """Inside the block, the mask `mask` (bool [n_total]) is a base: when it is scored alone its hidden states
        are recorded, and later rows that agree with it on the first layers start where they part from it
        (exact: those layers compute what they compute under the base). Its states are dropped on exit."""
        self._base = None if mask is None else _Base(np.asarray(mask, dtype=bool))
        try:
            yield
        finally:
            self._base = None

    def start_layers(self, masks: Masks, base: np.ndarray | None = None) -> np.ndarray:
        """Per mask, where its rows start: its first ablated layer, or where it parts from `base`."""
        starts = self._first_layers(masks)
        return starts if base is None else np.maximum(starts, self._parting_layers(masks, base))

    def base_plan(self, masks: Masks, per_pass: int) -> int | None:
        """Which of `masks` to score first, alone, as the base (`based_on`): the one that leaves the fewest layer
        passes in all, the others in chunks of `per_pass` that each start at their earliest row's layer, when
        that saves at least BASE_MIN_LAYERS layer passes (a whole mask's layers where masks share passes: the
        base then takes a pass of its own); else None."""
        n_layers = self.ablation.site.n_layers
        if not self.shortcuts.layer_reuse or len(masks) < 2:
            return None

        def passes(starts):  # layer passes of masks run in chunks sorted by where they start
            ordered = np.sort(starts)
            return sum(len(ordered[i:i + per_pass]) * (n_layers - ordered[i])
                       for i in range(0, len(ordered), per_pass))

        first = self._first_layers(masks)
        costs = [n_layers - first[j] + passes(np.delete(self.start_layers(masks, row), j))
                 for j, row in enumerate(masks.rows)]
        best = int(np.argmin(costs))
        return best if passes(first) - costs[best] >= (BASE_MIN_LAYERS if per_pass == 1 else n_layers) else None

    def _score_packed(self, requests: Requests, pack, mask: torch.Tensor,
                      start: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Several prefix groups in shared passes: their prefixes (LEFT-padded and attention-masked, so every
        suffix starts at the same cache index and sliding-window attention sees true distances) once per
        mask, then every member sequence on its own group's prefix cache. The pack and its padded layout are
        fixed by the items alone, so a sequence is laid out the same way under every mask. With `start` > 0
        (no mask touches a layer below it) both passes start at that layer from the pack's unablated states."""
        layout = _PackLayout.of(requests, pack, self.lm.tokenizer.pad_token_id, self.device)
        unablated = self._unablated_pack(pack, layout) if start else None
        start = start if unablated is not None else 0
        per_call = max(1, self.batch_tokens // layout.padded_tokens)
        total = np.zeros((mask.shape[0], layout.n_seq))
        greedy = np.zeros((mask.shape[0], layout.n_seq), dtype=bool)
        for m0 in range(0, mask.shape[0], per_call):
            chunk = mask[m0:m0 + per_call]
            scored = ScoredTokens(layout.seqs, layout.starts, chunk.shape[0], self.device)
            logits = self._packed_passes(layout, chunk, scored, start, unablated)
            self.stats.tokens += self.layer_share(layout.real_tokens * chunk.shape[0], start)
            total[m0:m0 + chunk.shape[0]], greedy[m0:m0 + chunk.shape[0]] = scored.reduce(logits)
        return total, greedy

    def _packed_passes(self, layout: _PackLayout, chunk: torch.Tensor, scored: ScoredTokens, start: int = 0,
                       unablated: _UnablatedPack | None = None, record: _UnablatedPack | None = None):
        """The prefix pass and the suffix pass of a pack under the masks `chunk` (mask-major rows), starting at
        layer `start` from `unablated` (the layers below take the unablated prefixes' K/V into the cache); the
        suffix pass's logits. `record` receives every layer's inputs and the prefixes' K/V."""
        model, c = self.lm.model, chunk.shape[0]
        with ExitStack() as stack:
            stack.enter_context(self.applied(chunk.repeat_interleave(layout.n_groups, dim=0)))
            if start:
                stack.enter_context(skipped_layers(model, start, unablated.prefix[start].repeat(c, 1, 1)))
            if record is not None:
                stack.enter_context(recorded_layer_inputs(model, record.prefix))
            cache = returned_cache(model(
                input_ids=layout.pre_ids.repeat(c, 1), attention_mask=layout.pre_real.repeat(c, 1),
                position_ids=layout.pre_positions.repeat(c, 1), use_cache=True, logits_to_keep=1))
        if record is not None:
            record.kv = [(layer.keys, layer.values) for layer in getattr(cache, "layers", ())]
            record.plain = all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None]))
        for layer in range(start):  # not run: their K/V are the unablated prefixes'
            cache.layers[layer].update(*(x.repeat(c, 1, 1, 1) for x in unablated.kv[layer]))
        cache.batch_select_indices((torch.arange(c, device=self.device)[:, None] * layout.n_groups
                                    + layout.group_of[None]).reshape(-1))
        with ExitStack() as stack:
            stack.enter_context(self.applied(chunk.repeat_interleave(layout.n_seq, dim=0)))
            stack.enter_context(scored.applied(model))
            if start:
                stack.enter_context(skipped_layers(model, start, unablated.suffix[start].repeat(c, 1, 1)))
            if record is not None:
                stack.enter_context(recorded_layer_inputs(model, record.suffix))
            return model(input_ids=layout.suf_ids.repeat(c, 1), attention_mask=layout.attention.repeat(c, 1),
                         position_ids=layout.positions.repeat(c, 1), use_cache=True, logits_to_keep=0,
                         **{self.cache_name: cache}).logits

    def _state_bytes(self, tokens: int) -> int:
        """What the hidden states entering every layer take for `tokens` positions."""
        return (self.ablation.site.n_layers * getattr(self.lm.model.config, "hidden_size", 0)
                * next(self.lm.model.parameters()).dtype.itemsize * tokens)

    def _group_bytes(self, requests: Requests, prefix: tuple[int, ...], members: list[int]) -> int:
        """What a prefix group's hidden states entering every layer take: its prefix and its rows' own tokens."""
        seqs = requests.sequences
        return self._state_bytes(len(prefix) + sum(len(seqs[s].context) + len(seqs[s].continuation) - 1
                                                   for s in members))

    @torch.no_grad()
    def _unablated_pack(self, pack, layout: _PackLayout) -> _UnablatedPack | None:
        """The pack's unablated states (computed once per evaluator), or None when the packs' states together
        would take more than LAYER_REUSE_BYTES (a thousand 5-shot MMLU items would take tens of GB) or the
        model's cache is not plain full attention (a sliding-window layer keeps only its window, so its K/V
        could not be handed back whole)."""
        key = tuple(prefix for prefix, _ in pack)
        if key not in self._unablated_packs:
            size = self._state_bytes(layout.padded_tokens)
            record = None
            if self._pack_bytes + size <= LAYER_REUSE_BYTES:
                self._pack_bytes += size
                record = _UnablatedPack([], [], [])
                unablated_row = torch.zeros(1, self.ablation.n_total, dtype=torch.bool, device=self.device)
                self._packed_passes(layout, unablated_row, ScoredTokens(layout.seqs, layout.starts, 1, self.device),
                                    record=record)
                self.stats.tokens += layout.real_tokens
                record = record if record.plain else None
            self._unablated_packs[key] = record
        return self._unablated_packs[key]

    def _run_prefix(self, prefix: tuple[int, ...], mask: torch.Tensor, start: int = 0, sources: list | None = None,
                    record: _Unablated | None = None):
        """The prefix under every mask: its K/V per layer (from layer `start` on, each mask's rows from its
        `sources` states), or a KV cache where the model cannot attend to a shared prefix without copies.
        `record` receives every layer's inputs (one mask)."""
        ids = torch.tensor([prefix], device=self.device).expand(mask.shape[0], -1)
        self.stats.tokens += self.layer_share(ids.numel(), start)
        if not self.shortcuts.shared_prefix:
            with self.applied(mask):
                return returned_cache(self.lm.model(input_ids=ids, use_cache=True, logits_to_keep=1))
        kv: dict = {}
        start_inputs = _per_mask(sources, lambda source: source.prefix[start]) if start else None
        inputs = [] if record is not None else None
        with shortcut_forward(self.lm.model, start=start, start_inputs=start_inputs, capture=kv,
                              layer_inputs=inputs), self.applied(mask):
            self.lm.model(input_ids=ids, use_cache=False, logits_to_keep=1)
        if record is not None:
            record.prefix = sources[0].prefix[:start] + inputs[start:] if start else inputs
        return kv

    @torch.no_grad()
    def _unablated_states(self, requests: Requests, prefix: tuple[int, ...], members: list[int]):
        """The unablated hidden states entering every layer for this prefix group (computed once per
        evaluator), or None when they would take more than LAYER_REUSE_BYTES."""
        if prefix in self._unablated:
            return self._unablated[prefix]
        model = self.lm.model
        inputs = {s: requests.sequences[s].context + requests.sequences[s].continuation[:-1] for s in members}
        if self._group_bytes(requests, prefix, members) > LAYER_REUSE_BYTES:
            self._unablated[prefix] = None
            return None
        prefix_inputs, prefix_kv = None, None
        if prefix:
            prefix_inputs, prefix_kv = [], {}
            with shortcut_forward(model, capture=prefix_kv, layer_inputs=prefix_inputs):
                model(input_ids=torch.tensor([prefix], device=self.device), use_cache=False, logits_to_keep=1)
        sequences = {}
        for chunk in requests.length_chunks(members, self.batch_tokens, shared_prefix=True):
            ids, _ = pad_batch([inputs[s] for s in chunk], self.lm.tokenizer.pad_token_id, device=self.device)
            positions = (torch.arange(ids.shape[1], device=self.device) + len(prefix))[None].expand(len(chunk), -1)
            layer_inputs: list = []
            with shortcut_forward(model, prefix=prefix_kv, rows_per_prefix=len(chunk), layer_inputs=layer_inputs):
                model(input_ids=ids, position_ids=positions, use_cache=False, logits_to_keep=1)
            stacked = torch.stack(layer_inputs, dim=1)  # [rows, n_layers, width, hidden]
            for r, s in enumerate(chunk):
                sequences[s] = stacked[r, :, :len(inputs[s])].clone()
        self.stats.tokens += len(prefix) + sum(len(x) for x in inputs.values())
        self._unablated[prefix] = _Unablated(prefix_inputs, sequences)
        return self._unablated[prefix]

    def _score_chunk(self, requests: Requests, chunk, prefix_len, prefix_cache, mask, start: int = 0,
                     sources: list | None = None, record: _Unablated | None = None):
        seqs = [requests.sequences[s] for s in chunk]
        n_masks, n_seq = mask.shape[0], len(seqs)
        inputs = [seq.context + seq.continuation[:-1] for seq in seqs]
        ids, _ = pad_batch(inputs, self.lm.tokenizer.pad_token_id)
        width = ids.shape[1]
        # first position whose logits predict a continuation token, per sequence
        scored = ScoredTokens(seqs, [len(seq.context) - 1 for seq in seqs], n_masks, self.device)
        rows_ids = ids.to(self.device).repeat(n_masks, 1)  # mask-major rows
        row_mask = mask.repeat_interleave(n_seq, dim=0)
        self.stats.tokens += self.layer_share(sum(len(x) for x in inputs) * n_masks, start)
        if self.shortcuts.shared_prefix:
            positions = None
            if prefix_len:
                positions = (torch.arange(width, device=self.device) + prefix_len)[None].expand(len(rows_ids), -1)
            start_inputs = _per_mask(sources, lambda source: source.rows(chunk, width, start)) if start else None
            layer_inputs = [] if record is not None else None
            with shortcut_forward(self.lm.model, start=start, start_inputs=start_inputs, prefix=prefix_cache,
                                 rows_per_prefix=n_seq, layer_inputs=layer_inputs), self.applied(row_mask), \
                    scored.applied(self.lm.model):
                logits = self.lm.model(input_ids=rows_ids, position_ids=positions, use_cache=False,
                                       logits_to_keep=0).logits
            if record is not None:
                stacked = torch.stack(layer_inputs[start:], dim=1)  # [rows, layers from start, width, hidden]
                for r, s in enumerate(chunk):
                    own = stacked[r, :, :len(inputs[r])]
                    record.sequences[s] = torch.cat([sources[0].sequences[s][:start], own]) if start else own.clone()
            return scored.reduce(logits)
        kwargs = {}  # the copying way: the prefix cache repeated for every row
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(n_seq)
            kwargs[self.cache_name] = cache
            kwargs["position_ids"] = (torch.arange(width, device=self.device) + prefix_len)[None].expand(
                rows_ids.shape[0], -1)
        with self.applied(row_mask), scored.applied(self.lm.model):
            logits = self.lm.model(input_ids=rows_ids, use_cache=prefix_cache is not None,
                                   logits_to_keep=0, **kwargs).logits
        return scored.reduce(logits)


def _per_mask(sources: list, rows) -> torch.Tensor:
    """Each mask's start inputs in mask order, `rows(source)` made once per distinct source."""
    made: dict = {}
    for source in sources:
        if id(source) not in made:
            made[id(source)] = rows(source)
    return torch.cat([made[id(source)] for source in sources])


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax in fp32 for half-precision models, in the model's own precision above that."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


NORMALISER_ELEMENTS = 1 << 20  # fp32 logits made at a time (as many scored positions as fit): a block that stays
# in cache is several times faster than one pass over all of them (the normaliser is memory-bound)


class ScoredTokens:
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
        with gathered_output_positions(model, self.rows, self.positions) as gathered:
            self.gathered = gathered
            yield

    def _token_logprobs(self, logits: torch.Tensor):
        """Per scored token: log p(target) and whether it is the argmax."""
        logits = logits[0] if self.gathered else logits[self.rows, self.positions]
        logprobs, argmax_ok = [], []
        rows = max(1, NORMALISER_ELEMENTS // logits.shape[-1])
        # split, not slices: a slice's backward writes into zeros the size of all the logits (one per block,
        # 25% of an MBPP gradient pass on Qwen's 152k vocabulary); split's backward concatenates once
        for block, targets in zip(logits.split(rows), self.targets.split(rows)):
            block = _at_least_fp32(block)
            # log_softmax's kernel is several times faster than logsumexp's on wide vocabularies
            logprobs.append(torch.log_softmax(block, dim=-1).gather(-1, targets[:, None]).squeeze(-1))
            # argmax in fp32 (the first of tied maxima, as greedy decoding picks): 0.4 s for 1890 positions of
            # Qwen's 152k vocabulary, where a maximum then a count of ties took 4 s (bf16 argmax is 4x slower)
            argmax_ok.append(block.detach().argmax(-1) == targets)
        return torch.cat(logprobs), torch.cat(argmax_ok)

    def reduce(self, logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Each sequence's continuation log-probability and whether greedy decoding reproduces it:
        [n_masks, n_seq]."""
        logprob, ok = self._token_logprobs(logits)
        n_rows = self.n_masks * self.n_seq
        total = torch.zeros(n_rows, dtype=torch.float64, device=logprob.device).index_add_(0, self.rows,
                                                                                          logprob.double())
        wrong = torch.zeros(n_rows, device=logprob.device).index_add_(0, self.rows, (~ok).float())
        shape = (self.n_masks, self.n_seq)
        return total.view(shape).cpu().numpy(), (wrong == 0).view(shape).cpu().numpy()

    def weighted_sum(self, logits: torch.Tensor, weights: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """(sum over rows r of weights[r] * log p(continuation r), differentiable; each row's log p)."""
        logprob, _ = self._token_logprobs(logits)
        per_token = torch.as_tensor(np.asarray(weights, dtype=np.float64), device=logprob.device)[
            self.rows % self.n_seq].to(logprob.dtype)
        per_row = torch.zeros(self.n_masks * self.n_seq, dtype=torch.float64, device=logprob.device).index_add_(
            0, self.rows, logprob.detach().double())
        return (per_token * logprob).sum(), per_row.cpu().numpy()


PACK_TOKENS = 2048  # tokens of one mask's rows in a pack of prefix groups


def _packs(groups, requests: Requests) -> list[list]:
    """Prefix groups in packs of about PACK_TOKENS per mask at most, each pack's prefixes and member suffixes
    padded to its longest: sorted longest prefix first, then cut where the padded tokens plus CHUNK_OVERHEAD
    per pack are fewest (exact, by dynamic programming over the sorted order). Packing the groups in item
    order had padded `general` (prefixes of 9-33 tokens) to 1.9x its tokens. A layout fixed by the items
    alone, the same under every mask."""
    def suffix(members):
        return max(len(requests.sequences[s].context) + len(requests.sequences[s].continuation) - 1
                   for s in members)

    order = sorted(groups, key=lambda g: (-len(g[0]), -suffix(g[1])))
    cost, cut = [0.0] * (len(order) + 1), [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        cost[end], longest_suffix, rows = np.inf, 0, 0
        for start in range(end - 1, -1, -1):  # the pack order[start:end], padded to order[start]'s prefix
            longest_suffix = max(longest_suffix, suffix(order[start][1]))
            rows += len(order[start][1])
            size = (end - start) * len(order[start][0]) + rows * longest_suffix
            if size > PACK_TOKENS and start < end - 1:  # a larger pack is larger still
                break
            if cost[start] + size + CHUNK_OVERHEAD < cost[end]:
                cost[end], cut[end] = cost[start] + size + CHUNK_OVERHEAD, start
    packs, end = [], len(order)
    while end:
        packs.append(order[cut[end]:end])
        end = cut[end]
    return packs[::-1]
