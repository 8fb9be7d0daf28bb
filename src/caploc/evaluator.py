"""The one batched evaluator: a task's items under MANY ablation masks.

Every method in caploc calls `Evaluator.evaluate(masks)`; nothing else runs the model on task items.

Rows of a forward pass are (mask, sequence) pairs, mask-major. For known-target and multiple-choice
tasks, one teacher-forced pass per row decides greedy exact match and gives the continuation's
log-probability. The few-shot prefix shared by a group of items is run once per mask and its KV cache
reused for all of that mask's items. Suffixes are RIGHT padded and run without an attention mask: for a
causal model the real tokens never see the pads, so every row is exact and its layout (positions,
padding) is the same under every mask, baseline included (DESIGN.md section 4).
Generation tasks use `generate()` with left padding; all masks of an item chunk share one layout.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from caploc.ablation import component_ablation, heads_to_mask
from caploc.errors import CaplocError
from caploc.models import LoadedModel
from caploc.tasks.base import Item, Task

GENERATE_ROWS = 64  # rows per generate() call: bounded by the KV cache of long generations


@dataclass
class EvalResult:
    """Scores of every item under every mask: `scores[metric]` is [n_masks, n_items]."""

    masks: np.ndarray  # bool [n_masks, n_heads_total]
    scores: dict[str, np.ndarray]
    item_ids: list[str]
    texts: list[list[str]] | None = None  # generation tasks: [n_masks][n_items]

    def mean(self, metric: str) -> np.ndarray:
        if metric not in self.scores:
            raise CaplocError(f"metric {metric!r} not computed; available: {', '.join(self.scores)}")
        return self.scores[metric].mean(axis=1)


@dataclass
class _Sequence:
    """One teacher-forced continuation: item `item` (choice `choice`) = prefix + context + continuation."""

    item: int
    choice: int
    prefix: tuple[int, ...]
    context: list[int]
    continuation: list[int]
    n_chars: int  # length of the continuation text, for acc_norm


@dataclass
class EvalStats:
    evaluations: int = 0  # masks computed by the model (not read from the store)
    reused: int = 0  # masks answered from the persistent store (not this evaluator's own memory)
    tokens: int = 0  # tokens run through the model
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"evaluations": self.evaluations, "reused": self.reused, "tokens": self.tokens,
                "seconds": round(self.seconds, 3)}


class Evaluator:
    def __init__(self, lm: LoadedModel, task: Task, items: list[Item], *, mode: str = "zero",
                 batch_tokens: int = 8192, store=None, progress: bool = False,
                 reference_items: list[Item] | None = None, max_new_tokens: int | None = None,
                 components: str = "heads", scale: float = 0.0):
        """`components`: what a mask column is (attention heads, or MLP neurons); `scale`: what a masked
        component is multiplied by (0 ablates; above 1 enhances)."""
        if not items:
            raise CaplocError("no items to evaluate")
        self.lm = lm
        self.task = task
        self.items = list(items)
        self.mode = mode
        self.batch_tokens = batch_tokens
        self.store = store
        self.progress = progress
        self.max_new_tokens = max_new_tokens or task.max_new_tokens
        self.stats = EvalStats()
        self._memory: dict[bytes, dict] = {}  # this evaluator's own results: a mask is never run twice
        self.device = next(lm.model.parameters()).device
        self.components = components
        self.scale = float(scale)
        self.ablation = component_ablation(lm.model, components, mode)
        self.ablation.attach()
        self._sequences = self._tokenize_sequences() if task.kind in ("target", "choice") else None
        if mode == "mean":
            self.ablation.fit_means(lambda setter: self._run_reference(reference_items or self.items, setter))
        self.task_fingerprint = task.fingerprint(self.items)
        self._key = {"model": lm.fingerprint, "task": self.task_fingerprint, "mode": self.mode,
                     "max_new_tokens": self.max_new_tokens if task.kind == "generate" else None}
        if components != "heads" or self.scale != 0.0:  # head ablation keeps the keys it always had
            self._key |= {"components": components, "scale": self.scale}

    def close(self) -> None:
        self.ablation.detach()

    def __enter__(self) -> "Evaluator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- public --------------------------------------------------------------------------------------
    @property
    def n_heads(self) -> int:
        """Mask width: the number of components (heads, or neurons)."""
        return self.ablation.n_total

    def _set_rows(self, mask: torch.Tensor) -> None:
        if self.scale == 0.0:
            self.ablation.set_mask(mask)
        else:
            self.ablation.set_scales(torch.where(mask.bool(), self.scale, 1.0))

    def key(self) -> dict:
        """What identifies an evaluation besides its mask (the store's key)."""
        return self._key

    def evaluate(self, masks) -> EvalResult:
        """masks: bool array/tensor [n_masks, n_heads_total], or a list of head-index collections."""
        mask = self._as_mask(masks)
        started = time.perf_counter()
        n_masks = mask.shape[0]
        metrics = self.metric_names()
        scores = {m: np.zeros((n_masks, len(self.items)), dtype=np.float64) for m in metrics}
        texts: list[list[str]] | None = [[] for _ in range(n_masks)] if self.task.kind == "generate" else None
        todo = []
        for row in range(n_masks):
            cached = self._memory.get(mask[row].numpy().tobytes())
            if cached is None and self.store is not None:
                cached = self.store.get(self.key(), mask[row])
                if cached is not None and not set(metrics) <= set(cached["scores"]):
                    cached = None  # stored by a version that computed fewer metrics: recompute
                if cached is not None:
                    self.stats.reused += 1
                    self._memory[mask[row].numpy().tobytes()] = cached
            if cached is None:
                todo.append(row)
                continue
            for m in metrics:
                scores[m][row] = cached["scores"][m]
            if texts is not None:
                texts[row] = cached.get("texts") or []
        # identical masks in one request are computed once
        unique: dict[bytes, list[int]] = {}
        for row in todo:
            unique.setdefault(mask[row].numpy().tobytes(), []).append(row)
        rows = [group[0] for group in unique.values()]
        if rows:
            self._compute(mask, rows, unique, scores, texts)
        self.stats.seconds += time.perf_counter() - started
        return EvalResult(masks=mask.numpy(), scores=scores, item_ids=[i.id for i in self.items], texts=texts)

    def tokens_per_mask(self) -> int | None:
        """Model tokens one mask costs on these items (shared prefixes counted once); None for generation,
        whose length depends on what the model writes."""
        if self._sequences is None:
            return None
        prefixes = {s.prefix for s in self._sequences}
        return sum(len(p) for p in prefixes) + sum(len(s.context) + len(s.continuation) - 1 for s in self._sequences)

    def answer_sequences(self) -> list[tuple[list[int], int]]:
        """Per item: the token ids of its prompt followed by its correct answer, and the index where the
        answer starts, tokenized exactly as the scores are (chat template, joint BPE merges)."""
        if self._sequences is None:
            raise CaplocError(f"task {self.task.name} has no known answer (it is a generation task)")
        rows: list = [None] * len(self.items)
        for seq in self._sequences:
            if self.task.kind == "target" or seq.choice == self.items[seq.item].label:
                ids = list(seq.prefix) + seq.context + seq.continuation
                rows[seq.item] = (ids, len(ids) - len(seq.continuation))
        return rows

    def target_tokens(self) -> np.ndarray:
        """Tokens of each item's known target (for perplexity: exp(-logprob.sum() / target_tokens.sum()))."""
        if self.task.kind != "target":
            raise CaplocError("target_tokens() needs a known-target task")
        counts = np.zeros(len(self.items))
        for seq in self._sequences:
            counts[seq.item] = len(seq.continuation)
        return counts

    def baseline(self) -> EvalResult:
        return self.evaluate(torch.zeros(1, self.n_heads, dtype=torch.bool))

    # -- internals -----------------------------------------------------------------------------------
    def metric_names(self) -> tuple[str, ...]:
        return {"target": ("acc", "logprob"), "choice": ("acc", "acc_norm", "logprob", "logprob_all"),
                "generate": self.task.metrics[:1]}[self.task.kind]

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

    def _compute(self, mask, rows, unique, scores, texts) -> None:
        from tqdm.auto import tqdm

        per_pass = self._masks_per_pass()
        bar = tqdm(total=len(rows), desc=f"eval {self.task.name}", unit="mask", disable=not self.progress,
                   leave=False)
        try:
            for start in range(0, len(rows), per_pass):
                chunk = rows[start:start + per_pass]
                chunk_mask = mask[chunk]
                if self.task.kind == "generate":
                    chunk_scores, chunk_texts = self._run_generate(chunk_mask)
                else:
                    chunk_scores, chunk_texts = self._run_teacher_forced(chunk_mask), None
                for j, row in enumerate(chunk):
                    duplicates = unique[mask[row].numpy().tobytes()]
                    for dup in duplicates:
                        for m, values in chunk_scores.items():
                            scores[m][dup] = values[j]
                        if texts is not None:
                            texts[dup] = chunk_texts[j]
                    record = {"scores": {m: v[j].tolist() for m, v in chunk_scores.items()}}
                    if chunk_texts is not None:
                        record["texts"] = chunk_texts[j]
                    self._memory[mask[row].numpy().tobytes()] = record
                    if self.store is not None:
                        self.store.put(self.key(), mask[row], record)
                    self.stats.evaluations += 1
                bar.update(len(chunk))
        finally:
            bar.close()

    def _masks_per_pass(self) -> int:
        if self.task.kind == "generate":  # rows = masks x items; keep about GENERATE_ROWS rows per call
            return max(1, GENERATE_ROWS // min(len(self.items), GENERATE_ROWS))
        rows = max(1, self.batch_tokens // self._row_tokens(range(len(self._sequences))))
        return max(1, min(64, rows // max(1, min(len(self._sequences), rows))))

    def _row_tokens(self, members) -> int:
        """Tokens a row holds in memory: its suffix plus the prefix KV cache it attends to (the repeated
        cache, not the matmuls, is what makes oversized batches slow on CPU)."""
        return max(len(self._sequences[s].prefix) + len(self._sequences[s].context)
                   + len(self._sequences[s].continuation) for s in members)

    # tokenization ---------------------------------------------------------------------------------
    def _encode(self, text: str, special: bool) -> list[int]:
        return self.lm.tokenizer(text, add_special_tokens=special)["input_ids"]

    def _prompt_parts(self, item: Item) -> tuple[str, str]:
        """(shared prefix, item context); chat tasks wrap both in the chat template, so share nothing."""
        if not self.task.chat:
            return item.prefix, item.context
        messages = [{"role": "user", "content": item.prefix + item.context}]
        text = self.lm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "", text

    def _tokenize_sequences(self) -> list[_Sequence]:
        """Token ids exactly as the whole prompt tokenizes (BPE merges across the prefix/context boundary
        matter: a separately tokenized few-shot prefix changes accuracy a lot), split into a prefix shared
        by the group and a per-item context; continuation ids are what the target adds to the prompt."""
        prompts = []
        for item in self.items:
            prefix, context = self._prompt_parts(item)
            if not prefix and not context:
                raise CaplocError(f"item {item.id} has an empty prompt")
            if self.task.kind == "choice" and item.label is None:
                raise CaplocError(f"item {item.id} has no label")
            prompts.append((prefix, self._encode(prefix + context, special=not self.task.chat)))
        # prefix text -> number of leading ids common to every prompt of its group: the few-shot text
        # plus whatever the items' own openings share ("Question: What is ")
        shared: dict[str, int] = {}
        first: dict[str, list[int]] = {}
        for prefix, ids in prompts:
            if prefix:
                reference = first.setdefault(prefix, ids)
                common = _common_length(reference, ids)
                shared[prefix] = min(shared.get(prefix, common), common)
        sequences = []
        for i, (item, (prefix, ids)) in enumerate(zip(self.items, prompts)):
            k = min(shared.get(prefix, 0), len(ids) - 1)
            continuations = [item.target] if self.task.kind == "target" else list(item.choices)
            for c, text in enumerate(continuations):
                if not text:
                    raise CaplocError(f"item {item.id} has an empty target/choice")
                sequences.append(_Sequence(i, c, tuple(ids[:k]), ids[k:], self._continuation_ids(prefix, item, ids, text),
                                           len(text)))
        return sequences

    def _continuation_ids(self, prefix: str, item: Item, prompt_ids: list[int], text: str) -> list[int]:
        _, context = self._prompt_parts(item)
        joint = self._encode(prefix + context + text, special=not self.task.chat)
        if joint[: len(prompt_ids)] == prompt_ids and len(joint) > len(prompt_ids):
            return joint[len(prompt_ids):]
        return self._encode(text, False)  # the target merges into the prompt's last token: encode apart

    # teacher-forced scoring -------------------------------------------------------------------------
    @torch.no_grad()
    def _run_teacher_forced(self, mask: torch.Tensor) -> dict[str, np.ndarray]:
        n_masks = mask.shape[0]
        seq_logprob = np.zeros((n_masks, len(self._sequences)))
        seq_greedy = np.zeros((n_masks, len(self._sequences)), dtype=bool)
        groups: dict[tuple[int, ...], list[int]] = {}
        for s, seq in enumerate(self._sequences):
            groups.setdefault(seq.prefix, []).append(s)
        mask_dev = mask.to(self.device)
        for prefix, members in groups.items():
            prefix_cache = self._run_prefix(prefix, mask_dev) if prefix else None
            per_chunk = max(1, self.batch_tokens // (self._row_tokens(members) * n_masks))
            for start in range(0, len(members), per_chunk):
                chunk = members[start:start + per_chunk]
                logprob, greedy = self._score_chunk(chunk, len(prefix), prefix_cache, mask_dev)
                seq_logprob[:, chunk] = logprob
                seq_greedy[:, chunk] = greedy
        return self._aggregate(seq_logprob, seq_greedy)

    def _run_prefix(self, prefix: tuple[int, ...], mask: torch.Tensor):
        ids = torch.tensor([prefix], device=self.device).expand(mask.shape[0], -1)
        self._set_rows(mask)
        try:
            out = self.lm.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        finally:
            self.ablation.clear()
        self.stats.tokens += ids.numel()
        return out.past_key_values

    def _score_chunk(self, chunk, prefix_len, prefix_cache, mask):
        seqs = [self._sequences[s] for s in chunk]
        n_masks, n_seq = mask.shape[0], len(seqs)
        inputs = [seq.context + seq.continuation[:-1] for seq in seqs]
        width = max(len(x) for x in inputs)
        pad = self.lm.tokenizer.pad_token_id or 0
        ids = torch.full((n_seq, width), pad, dtype=torch.long)
        for r, x in enumerate(inputs):
            ids[r, : len(x)] = torch.tensor(x)
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
        self._set_rows(row_mask)
        try:
            logits = self.lm.model(input_ids=rows_ids, use_cache=prefix_cache is not None,
                                   logits_to_keep=keep, **kwargs).logits
        finally:
            self.ablation.clear()
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

    def _aggregate(self, seq_logprob: np.ndarray, seq_greedy: np.ndarray) -> dict[str, np.ndarray]:
        n_masks = seq_logprob.shape[0]
        if self.task.kind == "target":
            order = [s.item for s in self._sequences]
            acc = np.zeros((n_masks, len(self.items)))
            logprob = np.zeros((n_masks, len(self.items)))
            acc[:, order] = seq_greedy
            logprob[:, order] = seq_logprob
            return {"acc": acc, "logprob": logprob}
        acc = np.zeros((n_masks, len(self.items)))
        acc_norm = np.zeros_like(acc)
        correct_lp = np.zeros_like(acc)
        all_lp = np.zeros_like(acc)  # mean log-likelihood over every choice: collapses under universal heads
        by_item: dict[int, list[int]] = {}
        for s, seq in enumerate(self._sequences):
            by_item.setdefault(seq.item, []).append(s)
        for i, members in by_item.items():
            lp = seq_logprob[:, members]
            chars = np.array([self._sequences[s].n_chars for s in members], dtype=np.float64)
            label = self.items[i].label
            acc[:, i] = lp.argmax(axis=1) == label
            acc_norm[:, i] = (lp / chars).argmax(axis=1) == label
            correct_lp[:, i] = lp[:, label]
            all_lp[:, i] = lp.mean(axis=1)
        return {"acc": acc, "acc_norm": acc_norm, "logprob": correct_lp, "logprob_all": all_lp}

    # generation -----------------------------------------------------------------------------------
    def _prompt_ids(self, item: Item) -> list[int]:
        prefix, context = self._prompt_parts(item)
        return self._encode(prefix + context, special=not self.task.chat)

    @torch.no_grad()
    def _run_generate(self, mask: torch.Tensor):
        tok = self.lm.tokenizer
        n_masks = mask.shape[0]
        per_chunk = max(1, min(len(self.items), GENERATE_ROWS // n_masks))
        scores = np.zeros((n_masks, len(self.items)))
        texts = [[""] * len(self.items) for _ in range(n_masks)]
        prompts = [self._prompt_ids(item) for item in self.items]
        pad = tok.pad_token_id
        for start in range(0, len(self.items), per_chunk):
            idx = list(range(start, min(len(self.items), start + per_chunk)))
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            attn = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):  # left padding: generation continues from the last column
                ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
                attn[r, width - len(prompts[i]):] = 1
            rows_ids = ids.repeat(n_masks, 1).to(self.device)
            rows_attn = attn.repeat(n_masks, 1).to(self.device)
            self._set_rows(mask.to(self.device).repeat_interleave(len(idx), dim=0))
            try:
                gen_kwargs = dict(max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad)
                if self.task.stop:
                    gen_kwargs.update(stop_strings=list(self.task.stop), tokenizer=tok)
                out = self.lm.model.generate(input_ids=rows_ids, attention_mask=rows_attn, **gen_kwargs)
            finally:
                self.ablation.clear()
            new = out[:, width:]
            self.stats.tokens += int(rows_attn.sum()) + int((new != pad).sum())
            decoded = tok.batch_decode(new, skip_special_tokens=True)
            for m in range(n_masks):
                for r, i in enumerate(idx):
                    text = self.task.cut_at_stop(decoded[m * len(idx) + r])
                    texts[m][i] = text
                    scores[m, i] = self.task.score(self.items[i], text)
        return {self.task.metrics[0]: scores}, texts

    # mean ablation reference ----------------------------------------------------------------------
    @torch.no_grad()
    def _run_reference(self, items: list[Item], set_weights) -> None:
        for start in range(0, len(items), 16):
            prompts = [self._prompt_ids(item) for item in items[start:start + 16]]
            width = max(len(p) for p in prompts)
            ids = torch.full((len(prompts), width), self.lm.tokenizer.pad_token_id or 0, dtype=torch.long)
            weights = torch.zeros((len(prompts), width))
            for r, p in enumerate(prompts):  # right padding, pads weighted 0
                ids[r, : len(p)] = torch.tensor(p)
                weights[r, : len(p)] = 1
            set_weights(weights)
            self.lm.model(input_ids=ids.to(self.device), logits_to_keep=1)


def _common_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
