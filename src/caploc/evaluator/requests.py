"""What to score: a task's items tokenized as the model sees them.

Log-likelihood tasks become teacher-forced sequences (prompt + one continuation each), tokenized exactly
as the whole prompt tokenizes (BPE merges across the few-shot/context boundary matter: a separately
tokenized few-shot prefix changes accuracy a lot) and split into a prefix shared by a group of items and a
per-item context. Generation tasks become prompts. Chat tasks wrap each prompt in the model's chat
template (and then share no prefix).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from caploc.errors import CaplocError
from caploc.tasks.base import GenerationTask, Item, LoglikelihoodTask, Task, TargetTask


MIN_SHARED_PREFIX = 16  # tokens: below this a separate prefix pass costs more than it saves
CHUNK_OVERHEAD = 128  # tokens' worth of fixed work per forward pass (hooks, the prefix K/V joined to the rows)


@dataclass
class Sequence:
    """One teacher-forced continuation: item `item` (continuation `choice`) = prefix + context + continuation."""

    item: int
    choice: int
    prefix: tuple[int, ...]
    context: list[int]
    continuation: list[int]


class Requests:
    def __init__(self, tokenizer, task: Task, items: list[Item]):
        if not items:
            raise CaplocError("no items to evaluate")
        self.tokenizer = tokenizer
        self.task = task
        self.items = list(items)
        self.generation = isinstance(task, GenerationTask)
        self.sequences: list[Sequence] | None = None
        if isinstance(task, LoglikelihoodTask):
            self.sequences = self._tokenize_sequences()

    # -- prompts -------------------------------------------------------------------------------------
    def encode(self, text: str, special: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def prompt_parts(self, item: Item) -> tuple[str, str]:
        """(shared prefix, item context); chat tasks wrap both in the chat template, so share nothing."""
        if not self.task.chat:
            return item.prefix, item.context
        messages = [{"role": "user", "content": item.prefix + item.context}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "", text

    def prompt_ids(self, item: Item) -> list[int]:
        prefix, context = self.prompt_parts(item)
        return self.encode(prefix + context, special=not self.task.chat)

    # -- teacher-forced sequences ----------------------------------------------------------------------
    def _tokenize_sequences(self) -> list[Sequence]:
        prompts = []
        for item in self.items:
            prefix, context = self.prompt_parts(item)
            if not prefix and not context:
                raise CaplocError(f"item {item.id} has an empty prompt")
            prompts.append((prefix, self.encode(prefix + context, special=not self.task.chat)))
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
            continuations = self.task.continuations(item)
            if item.contexts:
                sequences += self._per_choice_sequences(i, item, prefix, continuations)
                continue
            if prefix:
                k = min(shared[prefix], len(ids) - 1)
            else:  # an item's choices share its whole prompt: run it once per mask, not once per choice
                k = len(ids) - 1 if len(continuations) > 1 else 0
            prompt = "".join(self.prompt_parts(item))
            for c, text in enumerate(continuations):
                if not text:
                    raise CaplocError(f"item {item.id} has an empty target/choice")
                sequences.append(Sequence(i, c, tuple(ids[:k]), ids[k:], self._continuation_ids(prompt, ids, text)))
        return sequences

    def _per_choice_sequences(self, i: int, item: Item, prefix: str, continuations: list[str]) -> list[Sequence]:
        """Choice c = prefix + contexts[c] + continuations[c]; the token prefix all its contexts share (the
        sentence up to the blank) runs once per mask."""
        if len(item.contexts) != len(continuations):
            raise CaplocError(f"item {item.id}: {len(item.contexts)} contexts for {len(continuations)} choices")
        special = not self.task.chat
        prompts = [self.encode(prefix + context, special) for context in item.contexts]
        k = min(min(_common_length(prompts[0], p) for p in prompts), min(len(p) for p in prompts) - 1)
        out = []
        for c, (ids, context, text) in enumerate(zip(prompts, item.contexts, continuations)):
            out.append(Sequence(i, c, tuple(ids[:k]), ids[k:], self._continuation_ids(prefix + context, ids, text)))
        return out

    def _continuation_ids(self, prompt: str, prompt_ids: list[int], text: str) -> list[int]:
        joint = self.encode(prompt + text, special=not self.task.chat)
        if joint[: len(prompt_ids)] == prompt_ids and len(joint) > len(prompt_ids):
            return joint[len(prompt_ids):]
        return self.encode(text, False)  # the target merges into the prompt's last token: encode apart

    @cached_property
    def prompts(self) -> list[list[int]]:
        """Every item's prompt ids (generation and mean fitting), tokenized once."""
        return [self.prompt_ids(item) for item in self.items]

    @cached_property
    def generation_groups(self) -> list[tuple[tuple[int, ...], list[int]]]:
        """Generation prompts grouped by their few-shot prefix: (the token prefix every prompt of the group
        starts with, the items), items keeping their order. Chat prompts and prefixes shorter than
        MIN_SHARED_PREFIX tokens share nothing. Computed once, for every mask chunk."""
        groups: dict[str, list[int]] = {}
        for i, item in enumerate(self.items):
            groups.setdefault(self.prompt_parts(item)[0], []).append(i)
        out = []
        for prefix_text, members in groups.items():
            if not prefix_text or len(members) == 1:
                out.append(((), members))
                continue
            prompts = [self.prompts[i] for i in members]
            # every prompt keeps at least one token of its own, so generation starts from a real position
            common = min(min(_common_length(prompts[0], p) for p in prompts), min(len(p) for p in prompts) - 1)
            out.append((tuple(prompts[0][:common]) if common >= MIN_SHARED_PREFIX else (), members))
        return out

    def _need_sequences(self) -> list[Sequence]:
        if self.sequences is None:
            raise CaplocError(f"task {self.task.name} has no known answer (it is a generation task)")
        return self.sequences

    def prefix_groups(self) -> dict[tuple[int, ...], list[int]]:
        """Shared prefix -> indices of the sequences that start with it."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for s, seq in enumerate(self._need_sequences()):
            groups.setdefault(seq.prefix, []).append(s)
        return groups

    @property
    def packed(self) -> bool:
        """Whether teacher-forced scoring packs several prefix groups into shared passes (one prefix per
        multiple-choice item)."""
        return self.sequences is not None and sum(1 for p in self.prefix_groups() if p) > 1

    def row_tokens(self, members, shared_prefix: bool = False) -> int:
        """Tokens a row holds in memory: its suffix, plus the prefix KV cache it attends to unless the
        prefix is shared (its K/V then join a row only inside one layer's attention call)."""
        seqs = self._need_sequences()
        return max((0 if shared_prefix else len(seqs[s].prefix)) + len(seqs[s].context) + len(seqs[s].continuation)
                   for s in members)

    def length_chunks(self, members, tokens: int, shared_prefix: bool = False,
                      overhead: int = CHUNK_OVERHEAD) -> list[list[int]]:
        """Members in chunks of similar length, each padded to its longest and within `tokens` (a member
        longer than that alone): sorted longest first, then cut where the padded tokens plus `overhead` per
        chunk are fewest (exact, by dynamic programming over the sorted order). Filling each chunk in turn
        instead padded MBPP's rows (100 to 400 tokens) to 1.7x their tokens: the longest row's chunk took the
        next 19 at its length. A layout fixed by the items alone, the same under every mask."""
        length = {s: self.row_tokens([s], shared_prefix) for s in members}
        order = sorted(members, key=lambda s: -length[s])
        lengths = np.array([length[s] for s in order], dtype=np.float64)
        widest = max(1, int(tokens // max(1.0, lengths.min()))) if len(order) else 1  # members a chunk holds at most
        # cost[j]: the fewest tokens for order[:j]; a chunk order[i:j] costs (j - i) * lengths[i] + overhead
        cost, cut = np.zeros(len(order) + 1), np.zeros(len(order) + 1, dtype=int)
        for end in range(1, len(order) + 1):
            first = max(0, end - widest)
            padded = (end - np.arange(first, end)) * lengths[first:end]
            total = np.where(padded <= tokens, cost[first:end] + padded + overhead, np.inf)
            total[-1] = cost[end - 1] + lengths[end - 1] + overhead  # a member always fits alone
            best = int(np.argmin(total))
            cut[end], cost[end] = first + best, total[best]
        chunks, end = [], len(order)
        while end:
            chunks.append(order[cut[end]:end])
            end = cut[end]
        return chunks[::-1]

    def per_item(self, values: np.ndarray) -> list[np.ndarray]:
        """[n_masks, n_sequences] -> per item, [n_masks, n_continuations of the item]."""
        by_item: list[list[int]] = [[] for _ in self.items]
        for s, seq in enumerate(self._need_sequences()):
            by_item[seq.item].append(s)
        return [values[:, members] for members in by_item]

    def lengths(self) -> list[np.ndarray] | None:
        """Per item, the token count of each of its continuations (per-token metrics); None for generation."""
        if self.sequences is None:
            return None
        by_item: list[list[int]] = [[] for _ in self.items]
        for seq in self.sequences:
            by_item[seq.item].append(len(seq.continuation))
        return [np.array(n, dtype=np.float64) for n in by_item]

    def tokens_per_mask(self) -> int | None:
        """Model tokens one mask costs on these items (shared prefixes counted once); None for generation,
        whose length depends on what the model writes."""
        if self.sequences is None:
            return None
        prefixes = {s.prefix for s in self.sequences}
        return sum(len(p) for p in prefixes) + sum(len(s.context) + len(s.continuation) - 1 for s in self.sequences)

    def answer_sequences(self) -> list[tuple[list[int], int]]:
        """Per item: the token ids of its prompt followed by its correct answer, and the index where the
        answer starts, tokenized exactly as the scores are (chat template, joint BPE merges)."""
        rows: list = [None] * len(self.items)
        for seq in self._need_sequences():
            if seq.choice == self.task.answer_index(self.items[seq.item]):
                ids = list(seq.prefix) + seq.context + seq.continuation
                rows[seq.item] = (ids, len(ids) - len(seq.continuation))
        return rows

    def target_tokens(self) -> np.ndarray:
        """Tokens of each item's known target (for perplexity: exp(-logprob.sum() / target_tokens.sum()))."""
        if not isinstance(self.task, TargetTask):
            raise CaplocError("target_tokens() needs a known-target task")
        counts = np.zeros(len(self.items))
        for seq in self.sequences:
            counts[seq.item] = len(seq.continuation)
        return counts


def _common_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
