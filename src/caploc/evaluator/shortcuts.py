"""Forward passes that skip what is already known: the evaluator's two shortcuts.

Both are exact:
- a shared prefix (the few-shot examples) is computed once per mask, and every (mask, item) row attends to
  that mask's prefix K/V: the fused attention kernel over [prefix K/V | the row's own], the prefix's K/V
  placed in front of each row inside the attention call (no cache object is built or copied). Where the
  kernel cannot express the attention (a sliding window reaching into the prefix, softcapped scores) it is
  computed in two parts, queries batched per mask against the prefix keys and per row against the row's
  own keys, merged by their softmax normalisers;
- layer reuse: a mask whose first ablated component is in layer l leaves layers < l as they are without
  it, so its rows start at layer l from the unablated hidden states entering that layer (computed once).

Both work through transformers' own extension points (`caploc.hooks`), so they serve every architecture
that dispatches its attention through `AttentionInterface`: an attention function registered as
`caploc_prefix`, selected only inside `shortcut_forward`, and hooks on the decoder layers. Whether a
loaded model computes the same thing through them as through its plain forward is checked once per model
(`shortcuts`); a model that fails is evaluated the copying way.
"""

from __future__ import annotations

import weakref
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterator

import torch
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from caploc.arch import decoder_layers
from caploc.hooks import attention_implementation, recorded_layer_inputs, skipped_layers
from caploc.models import LoadedModel

IMPLEMENTATION = "caploc_prefix"
GROUPED_MASK_ELEMENTS = 1 << 24  # the stacked-heads mask of the CPU path (bytes); above this, the kernel's own GQA


@dataclass
class _Pass:
    prefix: dict | None = None  # layer -> (K, V) [prefixes, kv_heads, P, head_dim]
    rows_per_prefix: int = 1  # consecutive rows that share one prefix
    capture: dict | None = None  # layer -> (K, V) of this pass, when asked
    attended: set = field(default_factory=set)  # layers whose attention ran through this pass


_active: list[_Pass] = []


class Unsupported(Exception):
    """The model's attention uses something `caploc_prefix` does not compute (attention sinks)."""


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
               dropout: float = 0.0, scaling: float | None = None, sliding_window: int | None = None,
               softcap: float | None = None, s_aux=None, **_):
    """The AttentionInterface function: causal attention of each row over [its prefix | its own tokens]."""
    if not _active:
        raise RuntimeError("caploc_prefix attention used outside shortcut_forward")
    if s_aux is not None:
        raise Unsupported("attention sinks")
    state = _active[-1]
    layer = module.layer_idx
    state.attended.add(layer)
    if state.capture is not None:
        state.capture[layer] = (key, value)
    prefix = state.prefix.get(layer) if state.prefix else None
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = attend(query, key, value, scaling, sliding_window, softcap, prefix, state.rows_per_prefix)
    return out.transpose(1, 2).contiguous(), None


_registered: list[bool] = []


def _register() -> None:
    """Register the attention function with transformers once, when a shortcut is first taken."""
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(IMPLEMENTATION, _attention)
        _registered.append(True)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, window: int | None,
           softcap: float | None, prefix: tuple[torch.Tensor, torch.Tensor] | None,
           rows_per_prefix: int = 1) -> torch.Tensor:
    """Causal attention [rows, heads, S, d] of q over [prefix | k]: prefix K/V [groups, kv_heads, P, d] are
    shared by `rows_per_prefix` consecutive rows (rows = groups x rows_per_prefix) and sit at positions
    0..P-1, the rows' own keys at P..P+S-1. `window`: sliding-window size (a query sees keys fewer than
    `window` positions back); `softcap`: tanh capping of the scores (Gemma 2)."""
    rows, heads, length, dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    p_len = 0 if prefix is None else prefix[0].shape[2]
    windowed = window is not None and p_len + length > window
    if not windowed and softcap is None:
        # the fused kernel: scores never materialised, accumulated in fp32. Each row gets its prefix's K/V in
        # front of its own (a copy of kv_heads x P x d per row and layer, small beside the [heads, S, P] fp32
        # scores the two-part softmax below makes: 4x slower on MBPP's 400-token rows over a 570-token prefix)
        if prefix is not None:
            pk, pv = (x.repeat_interleave(rows_per_prefix, dim=0) for x in prefix)
            k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        if length == 1 or length == k.shape[2]:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=length > 1, scale=scaling,
                                                                    enable_gqa=group > 1)
        if q.device.type == "cpu" and group > 1 and group * length * k.shape[2] <= GROUPED_MASK_ELEMENTS:
            # the query heads of one kv head stacked as one head's queries: the CPU kernel then reads each kv
            # head once instead of a copy per query head (the same outputs to the bit; a Qwen2.5 GSM8K chunk's
            # attention 1.3x faster forward, 1.4-1.6x forward + backward)
            out = torch.nn.functional.scaled_dot_product_attention(
                q.reshape(rows, kv_heads, group * length, dim), k, v,
                attn_mask=_stacked_causal(length, k.shape[2], group, q.device), scale=scaling)
            return out.view(rows, heads, length, dim)
        # queries are the last `length` positions (is_causal would align them with the first keys)
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=causal_lower_right(length, k.shape[2]), scale=scaling, enable_gqa=group > 1)
    score_dtype = torch.promote_types(q.dtype, torch.float32)
    lowest = torch.finfo(score_dtype).min
    # in place where no gradient flows (evaluation); out of place under autograd (gradients of multipliers)
    inplace = not (torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, *(prefix or ()))))
    i = torch.arange(length, device=q.device)
    own_allowed = i[:, None] >= i[None, :]
    if windowed:
        own_allowed &= (i[:, None] - i[None, :]) < window
    # the row's own keys: [rows, kv_heads, group * S, S], the query heads of one kv head stacked
    own = _scores(q.reshape(rows, kv_heads, group * length, dim), k, scaling, softcap, score_dtype)
    own = _fill(own, ~own_allowed.repeat(group, 1), lowest, inplace)
    if prefix is None:
        weights = torch.softmax(own, dim=-1).to(v.dtype)
        return (weights @ v).view(rows, heads, length, dim)
    pk, pv = prefix
    groups = pk.shape[0]
    n = rows_per_prefix

    def to_prefix_layout(x):  # [rows, kv, group*S, c] -> [groups, kv, n*group*S, c]
        return x.reshape(groups, n, kv_heads, group * length, -1).transpose(1, 2).reshape(
            groups, kv_heads, n * group * length, -1)

    def to_row_layout(x):  # the inverse
        return x.reshape(groups, kv_heads, n, group * length, -1).transpose(1, 2).reshape(
            rows, kv_heads, group * length, -1)

    # the prefix keys, one matrix product per (prefix, kv head) for all its rows' queries
    shared = _scores(to_prefix_layout(q.reshape(rows, kv_heads, group * length, dim)), pk, scaling, softcap,
                     score_dtype)  # [groups, kv, n * group * S, P]
    if windowed:
        j = torch.arange(p_len, device=q.device)
        shared_allowed = (p_len + i[:, None] - j[None, :]) < window  # [S, P]
        shared = _fill(shared.view(groups, kv_heads, n * group, length, p_len), ~shared_allowed, lowest,
                       inplace).view(groups, kv_heads, n * group * length, p_len)
    # softmax over [prefix | own] from the two parts: a common maximum and a common normaliser
    top = torch.maximum(own.amax(-1, keepdim=True), to_row_layout(shared.amax(-1, keepdim=True)))
    if inplace:
        own.sub_(top).exp_()
        shared.sub_(to_prefix_layout(top)).exp_()
    else:
        top = top.detach()  # any common shift gives the same softmax
        own, shared = (own - top).exp(), (shared - to_prefix_layout(top)).exp()
    total = own.sum(-1, keepdim=True) + to_row_layout(shared.sum(-1, keepdim=True))
    if inplace:
        own.div_(total)
        shared.div_(to_prefix_layout(total))
    else:
        own, shared = own / total, shared / to_prefix_layout(total)
    out = own.to(v.dtype) @ v + to_row_layout(shared.to(pv.dtype) @ pv)
    return out.view(rows, heads, length, dim)


@lru_cache(maxsize=4)
def _stacked_causal(length: int, keys: int, group: int, device: torch.device) -> torch.Tensor:
    """[group * length, keys] bool: the lower-right causal mask (the last `length` positions' queries) once per
    stacked query head."""
    return torch.ones(length, keys, dtype=torch.bool, device=device).tril(keys - length).repeat(group, 1)


def _fill(x: torch.Tensor, where: torch.Tensor, value: float, inplace: bool) -> torch.Tensor:
    return x.masked_fill_(where, value) if inplace else x.masked_fill(where, value)


def _scores(q: torch.Tensor, k: torch.Tensor, scaling: float, softcap: float | None, dtype) -> torch.Tensor:
    """Attention scores in `dtype` (at least fp32), the product too: a bf16 product rounds large scores (Qwen2's
    reach the hundreds) by more than fused kernels, which accumulate and scale in fp32, do."""
    scores = (q.to(dtype) @ k.to(dtype).transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    return scores


@contextmanager
def shortcut_forward(model: nn.Module, *, start: int = 0, start_inputs: torch.Tensor | None = None,
                     prefix: dict | None = None, rows_per_prefix: int = 1, capture: dict | None = None,
                     layer_inputs: list | None = None) -> Iterator[_Pass]:
    """Inside the block, the model's forward passes
    - skip the decoder layers below `start` and give layer `start` the hidden states `start_inputs`;
    - let every row attend to `prefix` (layer -> (K, V) [groups, kv_heads, P, d], one group per
      `rows_per_prefix` consecutive rows) before its own tokens; the caller passes position_ids after P;
    - record each layer's K/V in `capture` and, if `layer_inputs` is a list, each layer's input hidden
      states (index = layer).
    Only attention masks for right-padded rows are supported (none: causal, plus sliding windows)."""
    _register()
    state = _Pass(prefix=prefix, rows_per_prefix=rows_per_prefix, capture=capture)
    with ExitStack() as stack:
        stack.enter_context(attention_implementation(model, IMPLEMENTATION))
        _active.append(state)
        stack.callback(_active.pop)
        if start > 0:
            stack.enter_context(skipped_layers(model, start, start_inputs))
        if layer_inputs is not None:
            stack.enter_context(recorded_layer_inputs(model, layer_inputs))
        yield state


@dataclass(frozen=True)
class Shortcuts:
    """Which shortcuts a model's forward can take exactly."""

    shared_prefix: bool  # rows attend to a shared prefix's K/V without copies
    layer_reuse: bool  # rows may start at a later layer from cached hidden states
    reason: str = ""  # why not, when not


NONE = Shortcuts(False, False, "turned off")
_checked: "weakref.WeakKeyDictionary[nn.Module, Shortcuts]" = weakref.WeakKeyDictionary()


def shortcuts(lm: LoadedModel) -> Shortcuts:
    """Whether this model computes through `shortcut_forward` what its plain forward computes: checked once
    per model on random tokens (a prefix, two rows, the second half of the layers)."""
    if lm.model not in _checked:
        _checked[lm.model] = _check(lm.model)
    return _checked[lm.model]


def set_shortcuts(lm: LoadedModel, value: Shortcuts) -> None:
    """Decide for this model instead of checking (benchmarks that compare with the copying way)."""
    _checked[lm.model] = value


def _differs(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether two log-probability tensors [rows, positions, vocab] disagree beyond what the precision allows.
    fp32: 1e-3 nats on any token. Half precision rounds far-tail log-probabilities by more than a nat, so
    there the predicted distributions are compared instead, by their largest KL divergence: rounding stays
    an order of magnitude below the bound, an ignored prefix or unshifted positions far above it."""
    if torch.finfo(dtype).bits >= 32:
        return bool((got - expected).abs().max() > 1e-3)
    return bool((expected.exp() * (expected - got)).sum(-1).max() > 0.05)


@torch.no_grad()
def _check(model: nn.Module) -> Shortcuts:
    param = next(model.parameters())
    generator = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().weight.shape[0]
    p_len, s_len, rows = 7, 5, 2
    ids = torch.randint(0, vocab, (rows, p_len + s_len), generator=generator).to(param.device)
    ids[:, :p_len] = ids[0, :p_len]  # the rows share their first p_len tokens
    n_layers = len(decoder_layers(model))

    def logprobs(logits):
        return torch.log_softmax(logits.float(), dim=-1)

    expected = logprobs(model(input_ids=ids).logits[:, p_len:])
    positions = torch.arange(p_len, p_len + s_len, device=param.device)[None].expand(rows, -1)
    try:
        kv: dict = {}
        inputs: list = []
        with shortcut_forward(model, capture=kv, layer_inputs=inputs) as state:
            model(input_ids=ids[:1, :p_len], use_cache=False)
        inputs_suffix: list = []
        with shortcut_forward(model, prefix=kv, rows_per_prefix=rows, layer_inputs=inputs_suffix):
            got = logprobs(model(input_ids=ids[:, p_len:], position_ids=positions, use_cache=False).logits)
        if len(state.attended) != n_layers:
            return Shortcuts(False, False, "its attention does not dispatch through AttentionInterface")
        if _differs(got, expected, param.dtype):
            return Shortcuts(False, False, "attention over a shared prefix differs from its plain forward")
        start = n_layers // 2
        if start == 0:
            return Shortcuts(True, False, "one layer")
        kv_late: dict = {}
        with shortcut_forward(model, start=start, start_inputs=inputs[start], capture=kv_late) as late:
            model(input_ids=ids[:1, :p_len], use_cache=False)
        with shortcut_forward(model, start=start, start_inputs=inputs_suffix[start], prefix=kv_late,
                             rows_per_prefix=rows):
            got = logprobs(model(input_ids=ids[:, p_len:], position_ids=positions, use_cache=False).logits)
        if late.attended != set(range(start, n_layers)) or _differs(got, expected, param.dtype):
            return Shortcuts(True, False, "starting at a later layer differs from its plain forward")
        return Shortcuts(True, True)
    except (Unsupported, TypeError, ValueError, IndexError, KeyError, RuntimeError) as error:
        return Shortcuts(False, False, f"{type(error).__name__}: {error}")
