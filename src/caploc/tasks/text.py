"""Offline text for token streams and perplexity: the documentation topics that ship with CPython
(`pydoc_data.topics`, about 465k characters of English prose and code from the Python reference manual).

`text_stream()` is the ordered text; `TextPerplexity` (task `text`) scores chunks of it as known targets (the
chunk after its first words), so perplexity = exp(-sum of target log-probabilities / target tokens) goes
through the one evaluator like any task (`token_logprob`, the chunk's log-probability per token, is what
localization uses). Chunks come from the stream's last `held_out` share, which SAE
training (`density`) never reads. As a control task (`locate --control general,text`) it measures what
multiple-choice answers do not: whether the model still models ordinary prose. Heads that process tokens
for every task (layers 0-2 here) cost little on `general` and a lot on `text`.
"""

from __future__ import annotations

import numpy as np

from caploc.tasks.base import Item, TargetTask, register_task

HELD_OUT_SHARE = 0.2


def text_stream() -> str:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return "\n\n".join(topics[key].strip() for key in sorted(topics))


def split_stream(held_out: float = HELD_OUT_SHARE) -> tuple[str, str]:
    """(training part, held-out part) of the stream, cut at a paragraph boundary."""
    text = text_stream()
    cut = text.rfind("\n\n", 0, int(len(text) * (1 - held_out)))
    return text[:cut], text[cut + 2:]


@register_task()
class TextPerplexity(TargetTask):
    """Prose language modelling: the log-probability per token of held-out text (a control: general damage)."""

    name = "text"
    default_metric = "logprob"
    linear_metrics = ("logprob", "token_logprob")

    def metric_names(self) -> tuple[str, ...]:
        return ("acc", "logprob", "token_logprob")

    @property
    def identification_metric(self) -> str:
        """The chunks' log-probability per token: a chunk's share of probability is per token."""
        return "token_logprob"

    def process_loglikelihoods(self, items, logprob, greedy, lengths=None):
        out = super().process_loglikelihoods(items, logprob, greedy, lengths)
        return out | {"token_logprob": out["logprob"] / np.array([n[0] for n in lengths])[None]}

    def __init__(self, chunk_chars: int = 200):  # about 45 tokens of SmolLM2 per chunk
        super().__init__(shots=0, chat=False)
        self.chunk_chars = chunk_chars
        _, held_out = split_stream()
        self.chunks = []
        start = 0
        while start < len(held_out):
            end = held_out.find(" ", start + chunk_chars)
            end = len(held_out) if end == -1 else end
            chunk = held_out[start:end].strip()
            if len(chunk.split()) > 8:
                self.chunks.append(chunk)
            start = end

    def config(self) -> dict:
        return super().config() | {"source": "pydoc_data.topics (held-out share)", "chunk_chars": self.chunk_chars}

    def pool(self, seed: int, needed: int) -> list[Item]:
        items = []
        for i, chunk in enumerate(self.chunks):
            words = chunk.split(" ")
            context, target = " ".join(words[:4]), " " + " ".join(words[4:])
            items.append(Item(id=f"text-{i}", context=context, target=target))
        return self.shuffled(items, seed, "text")
