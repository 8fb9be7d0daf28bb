"""Every way caploc reaches into a transformers model besides the component sites (`sites`), in one place.

Each is a context manager that leaves the model exactly as it found it on every exit path:
- `attention_implementation`: run the attention layers through a named `AttentionInterface` function
  (the evaluator's shared-prefix attention);
- `attention_weights`: the attention weights of a forward pass, through the eager implementation;
- `skipped_layers`: decoder layers below `start` pass their input through, and layer `start` receives given
  hidden states (rows that start at their first ablated layer);
- `recorded_layer_inputs`: each decoder layer's input hidden states, kept;
- `gathered_output_positions`: the output embedding sees only the (row, position) pairs that are scored.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterator

import torch
from torch import nn

from caploc.arch import decoder_layers


@contextmanager
def attention_implementation(model: nn.Module, name: str) -> Iterator[None]:
    """Every attention module of `model` dispatches to the implementation `name` inside the block (its
    config's `_attn_implementation`, which transformers reads at every forward)."""
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "config")}
    saved = {key: config._attn_implementation for key, config in configs.items()}
    try:
        for config in configs.values():
            config._attn_implementation = name
        yield
    finally:
        for key, config in configs.items():
            config._attn_implementation = saved[key]


@torch.no_grad()
def attention_weights(model: nn.Module, batches: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Per batch of token ids, the per-layer attention weights [batch, heads, T, T] (fp32, on the CPU), from
    the eager implementation (the fused kernels do not return them), set through transformers' own switch and
    switched back."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    device = next(model.parameters()).device
    try:
        return [[a.float().cpu() for a in model(input_ids=ids.to(device), output_attentions=True).attentions]
                for ids in batches]
    finally:
        model.set_attn_implementation(previous)


def _unchanged(hidden_states, *args, **kwargs):
    return hidden_states


def _restore_forward(layer: nn.Module, own_forward) -> None:
    """Back to the class's forward, or to the one a wrapper (accelerate's device hooks) had put there."""
    if own_forward is None:
        del layer.forward
    else:
        layer.forward = own_forward


@contextmanager
def skipped_layers(model: nn.Module, start: int, inputs: torch.Tensor) -> Iterator[None]:
    """The decoder layers below `start` return their input unchanged and layer `start` receives `inputs`."""
    layers = decoder_layers(model)
    with ExitStack() as stack:
        for layer in layers[:start]:
            stack.callback(_restore_forward, layer, layer.__dict__.get("forward"))
            layer.forward = _unchanged

        def replace(module, args, kwargs):
            if args:
                return (inputs.to(args[0].dtype),) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": inputs.to(kwargs["hidden_states"].dtype)}

        handle = layers[start].register_forward_pre_hook(replace, with_kwargs=True)
        stack.callback(handle.remove)
        yield


@contextmanager
def recorded_layer_inputs(model: nn.Module, store: list) -> Iterator[None]:
    """`store[l]` becomes the hidden states entering decoder layer l, for each layer that runs."""
    with ExitStack() as stack:
        for index, layer in enumerate(decoder_layers(model)):
            def record(module, args, kwargs, index=index):
                while len(store) <= index:
                    store.append(None)
                store[index] = args[0] if args else kwargs["hidden_states"]

            handle = layer.register_forward_pre_hook(record, with_kwargs=True)
            stack.callback(handle.remove)
        yield


@contextmanager
def gathered_output_positions(model: nn.Module, rows: torch.Tensor, positions: torch.Tensor) -> Iterator[bool]:
    """Inside the block the output embedding sees only the hidden states at (rows[i], positions[i]), as one
    batch row [1, len(rows), hidden]: the vocabulary projection runs on the scored tokens and no others, and
    the model's own elementwise logit post-processing (Gemma 2's softcapping) still applies. Yields whether
    it could (False for a model without an output-embedding module: gather its logits afterwards)."""
    head = model.get_output_embeddings()
    if head is None:
        yield False
        return

    def gather(module, args):
        return (args[0][rows, positions][None],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        yield True
    finally:
        handle.remove()
