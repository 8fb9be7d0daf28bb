"""What every pass over the model under ablation masks shares: the model and its ablation hooks, the tokens a
pass may hold, which shortcuts the model takes exactly, and the counters. The passes themselves are
`scoring` (teacher-forced log-likelihoods), `gradients` (with respect to the component multipliers) and
`generation` (greedy decoding).

Rows of a pass are (mask, sequence) pairs, mask-major.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import cached_property

import torch

from caploc.ablation import ComponentAblation
from caploc.evaluator.batches import pad_batch
from caploc.evaluator.requests import Requests
from caploc.evaluator.shortcuts import Shortcuts, shortcuts
from caploc.masks import Masks
from caploc.models import LoadedModel


@dataclass
class EvalStats:
    evaluations: int = 0  # masks computed by the model (not read from the store)
    reused: int = 0  # masks answered from the persistent store (not this evaluator's own memory)
    tokens: int = 0  # tokens run through the model (rows that start at a later layer count that share)
    gradient_tokens: int = 0  # of which for gradients: a forward + backward counts as three passes
    logical_gradient_tokens: int = 0  # what the gradients asked for cost, whether computed or read from the store
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"evaluations": self.evaluations, "reused": self.reused, "tokens": self.tokens,
                "gradient_tokens": self.gradient_tokens, "seconds": round(self.seconds, 3)}


CPU_BATCH_TOKENS = 8192  # on CPUs the batch is bounded by cache-friendly sizes, not memory
MAX_BATCH_TOKENS = 1 << 18


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


def returned_cache(output):
    """The KV cache a forward pass returned, under either of transformers' names for it."""
    return output["cache"] if "cache" in output else output.past_key_values


class ModelRunner:
    def __init__(self, lm: LoadedModel, ablation: ComponentAblation, stats: EvalStats,
                 batch_tokens: int | None = None, scale: float = 0.0):
        self.lm = lm
        self.ablation = ablation
        self.stats = stats
        self.batch_tokens = batch_tokens or default_batch_tokens(lm)
        self.scale = float(scale)
        self.device = next(lm.model.parameters()).device

    @cached_property
    def cache_name(self) -> str:
        """The KV cache's argument name in this transformers' forward: `cache` (5.x), `past_key_values` before."""
        return "cache" if "cache" in inspect.signature(self.lm.model.forward).parameters else "past_key_values"

    @cached_property
    def shortcuts(self) -> Shortcuts:
        """What this model's forward can skip: copies of a shared prefix, layers before the first ablated."""
        return shortcuts(self.lm)

    def first_layer(self, masks: Masks) -> int:
        """The first decoder layer that any of `masks` touches; the last layer for no ablation (rows must still
        run one layer to be scored)."""
        site = self.ablation.site
        return masks.first_layer(site.n_units, site.n_layers)

    def layer_share(self, tokens: int, start: int) -> int:
        """Tokens counted for rows that run only the layers from `start` on."""
        n_layers = self.ablation.site.n_layers
        return tokens * (n_layers - start) // n_layers

    def applied(self, rows: torch.Tensor):
        """The components masked in `rows` (bool [rows, n_total] on the device) are zeroed (scale 0) or
        multiplied by `scale` inside the block."""
        if self.scale == 0.0:
            return self.ablation.applied(rows)
        scale = torch.tensor(self.scale, dtype=torch.float64)  # cast to the model's dtype in the hook, not before
        return self.ablation.applied(scales=torch.where(rows.bool(), scale, torch.ones((), dtype=torch.float64)))

    @torch.no_grad()
    def reference(self, requests: Requests, set_weights) -> None:
        """Run the unablated model over the items' prompts, marking real tokens (mean ablation's fit)."""
        prompts = requests.prompts
        for start in range(0, len(prompts), 16):
            ids, real = pad_batch(prompts[start:start + 16], self.lm.tokenizer.pad_token_id)
            set_weights(real.float())  # right padding, pads weighted 0
            self.lm.model(input_ids=ids.to(self.device), logits_to_keep=1)
