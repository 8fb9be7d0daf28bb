"""Forward passes that skip what is already known.

Two savings for the masked evaluator, both exact:
- a shared prefix (the few-shot examples) is computed once per mask, and every (mask, item) row attends to
  that mask's prefix K/V directly: the K/V are never copied per row or concatenated into a cache. The
  attention over [prefix | row] is computed in two parts, queries batched per mask against the prefix keys
  and per row against the row's own keys, merged by their softmax normalisers;
- layer reuse: a mask whose first ablated component is in layer l leaves layers < l as they are without
  it, so its rows start at layer l from the unablated hidden states entering that layer (computed once).

Both work through transformers' own extension points, so they serve every architecture that dispatches its
attention through `AttentionInterface`: an attention function registered as `caploc_partial`, selected only
inside `partial_forward`, and forward hooks on the decoder layers. Whether a loaded model computes the same
thing through them as through its plain forward is checked once per model (`support`); a model that fails
is evaluated the copying way.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn
from transformers import AttentionInterface

from caploc.arch import decoder_layers
from caploc.models import LoadedModel

IMPLEMENTATION = "caploc_partial"


@dataclass
class _Pass:
    prefix: dict | None = None  # layer -> (K, V) [prefixes, kv_heads, P, head_dim]
    rows_per_prefix: int = 1  # consecutive rows that share one prefix
    capture: dict | None = None  # layer -> (K, V) of this pass, when asked
    attended: set = field(default_factory=set)  # layers whose attention ran through this pass


_active: list[_Pass] = []


class Unsupported(Exception):
    """The model's attention uses something `caploc_partial` does not compute (attention sinks)."""


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
               dropout: float = 0.0, scaling: float | None = None, sliding_window: int | None = None,
               softcap: float | None = None, s_aux=None, **_):
    """The AttentionInterface function: causal attention of each row over [its prefix | its own tokens]."""
    if not _active:
        raise RuntimeError("caploc_partial attention used outside partial_forward")
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


AttentionInterface.register(IMPLEMENTATION, _attention)


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
    if prefix is None and not windowed and softcap is None:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=length > 1, scale=scaling,
                                                                enable_gqa=group > 1)
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


def _fill(x: torch.Tensor, where: torch.Tensor, value: float, inplace: bool) -> torch.Tensor:
    return x.masked_fill_(where, value) if inplace else x.masked_fill(where, value)


def _scores(q: torch.Tensor, k: torch.Tensor, scaling: float, softcap: float | None, dtype) -> torch.Tensor:
    scores = (q @ k.transpose(-1, -2)).to(dtype) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    return scores


@contextmanager
def partial_forward(model: nn.Module, *, start: int = 0, start_inputs: torch.Tensor | None = None,
                    prefix: dict | None = None, rows_per_prefix: int = 1, capture: dict | None = None,
                    layer_inputs: list | None = None) -> Iterator[_Pass]:
    """Inside the block, the model's forward passes
    - skip the decoder layers below `start` and give layer `start` the hidden states `start_inputs`;
    - let every row attend to `prefix` (layer -> (K, V) [groups, kv_heads, P, d], one group per
      `rows_per_prefix` consecutive rows) before its own tokens; the caller passes position_ids after P;
    - record each layer's K/V in `capture` and, if `layer_inputs` is a list, each layer's input hidden
      states (index = layer).
    Only attention masks for right-padded rows are supported (none: causal, plus sliding windows)."""
    layers = decoder_layers(model)
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "config")}
    saved = {key: config._attn_implementation for key, config in configs.items()}
    state = _Pass(prefix=prefix, rows_per_prefix=rows_per_prefix, capture=capture)
    with ExitStack() as stack:
        for key, config in configs.items():
            config._attn_implementation = IMPLEMENTATION
            stack.callback(setattr, config, "_attn_implementation", saved[key])
        _active.append(state)
        stack.callback(_active.pop)
        if start > 0:
            for layer in layers[:start]:
                stack.callback(_restore_forward, layer, layer.__dict__.get("forward"))
                layer.forward = _unchanged
            stack.enter_context(_replacing_input(layers[start], start_inputs))
        if layer_inputs is not None:
            for index, layer in enumerate(layers):
                handle = layer.register_forward_pre_hook(_recorder(layer_inputs, index), with_kwargs=True)
                stack.callback(handle.remove)
        yield state


def _unchanged(hidden_states, *args, **kwargs):
    return hidden_states


def _restore_forward(layer: nn.Module, own_forward) -> None:
    """Back to the class's forward, or to the one a wrapper (accelerate's device hooks) had put there."""
    if own_forward is None:
        del layer.forward
    else:
        layer.forward = own_forward


def _recorder(store: list, index: int):
    def record(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        while len(store) <= index:
            store.append(None)
        store[index] = hidden
    return record


@contextmanager
def _replacing_input(layer: nn.Module, hidden: torch.Tensor):
    def replace(module, args, kwargs):
        if args:
            return (hidden.to(args[0].dtype),) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden.to(kwargs["hidden_states"].dtype)}

    handle = layer.register_forward_pre_hook(replace, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@dataclass(frozen=True)
class Support:
    shared_prefix: bool  # rows attend to a shared prefix's K/V without copies
    layer_reuse: bool  # rows may start at a later layer from cached hidden states
    reason: str = ""  # why not, when not


def support(lm: LoadedModel) -> Support:
    """Whether this model computes through `partial_forward` what its plain forward computes: checked once
    on random tokens (a prefix, two rows, the second half of the layers) and remembered on the model."""
    if "partial_forward" not in lm.extra:
        lm.extra["partial_forward"] = _check(lm.model)
    return lm.extra["partial_forward"]


def _differs(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether two log-probability tensors [rows, positions, vocab] disagree beyond what the precision allows.
    fp32: 1e-3 nats on any token. Half precision cannot promise that: on the random tokens of the check,
    SmolLM2 in bf16 is 1.7 nats (max over the vocabulary) from its own fp32 forward, and 0.42 from its own
    KV-cache path, in the far tail of the distribution. So there the predicted distributions are compared
    instead, by their largest KL divergence: bf16 rounding gave 0.004-0.012 nats, a prefix ignored 3.5 and
    positions not offset 0.9."""
    if torch.finfo(dtype).bits >= 32:
        return bool((got - expected).abs().max() > 1e-3)
    return bool((expected.exp() * (expected - got)).sum(-1).max() > 0.05)


@torch.no_grad()
def _check(model: nn.Module) -> Support:
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
        with partial_forward(model, capture=kv, layer_inputs=inputs) as state:
            model(input_ids=ids[:1, :p_len], use_cache=False)
        inputs_suffix: list = []
        with partial_forward(model, prefix=kv, rows_per_prefix=rows, layer_inputs=inputs_suffix):
            got = logprobs(model(input_ids=ids[:, p_len:], position_ids=positions, use_cache=False).logits)
        if len(state.attended) != n_layers:
            return Support(False, False, "its attention does not dispatch through AttentionInterface")
        if _differs(got, expected, param.dtype):
            return Support(False, False, "attention over a shared prefix differs from its plain forward")
        start = n_layers // 2
        if start == 0:
            return Support(True, False, "one layer")
        kv_late: dict = {}
        with partial_forward(model, start=start, start_inputs=inputs[start], capture=kv_late) as late:
            model(input_ids=ids[:1, :p_len], use_cache=False)
        with partial_forward(model, start=start, start_inputs=inputs_suffix[start], prefix=kv_late,
                             rows_per_prefix=rows):
            got = logprobs(model(input_ids=ids[:, p_len:], position_ids=positions, use_cache=False).logits)
        if late.attended != set(range(start, n_layers)) or _differs(got, expected, param.dtype):
            return Support(True, False, "starting at a later layer differs from its plain forward")
        return Support(True, True)
    except (Unsupported, TypeError, ValueError, IndexError, KeyError, RuntimeError) as error:
        return Support(False, False, f"{type(error).__name__}: {error}")
