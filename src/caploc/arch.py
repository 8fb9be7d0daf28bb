"""Where each supported architecture keeps its decoder layers and attention output projections.

Head ablation hooks the input of the attention output projection (`o_proj` and its equivalents): the
slice [h*d:(h+1)*d] of that input is exactly query head h's output, independent of the attention kernel
and exact under GQA.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from caploc.errors import CaplocError
from caploc.components import HeadLayout, NeuronLayout


@dataclass(frozen=True)
class ArchSpec:
    layers: str  # attribute path from the CausalLM to the list of decoder layers
    attn_out: str  # attribute path from a layer to the attention output projection
    mlp_down: str  # attribute path from a layer to the MLP down projection
    conv1d: bool = False  # GPT-2 style Conv1D: weight is [in, out] instead of [out, in]


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec("model.layers", "self_attn.o_proj", "mlp.down_proj"),
    "mistral": ArchSpec("model.layers", "self_attn.o_proj", "mlp.down_proj"),
    "qwen2": ArchSpec("model.layers", "self_attn.o_proj", "mlp.down_proj"),
    "qwen3": ArchSpec("model.layers", "self_attn.o_proj", "mlp.down_proj"),
    "gemma": ArchSpec("model.layers", "self_attn.o_proj", "mlp.down_proj"),
    "gemma2": ArchSpec("model.layers", "self_attn.o_proj", "mlp.down_proj"),
    "gemma3_text": ArchSpec("model.layers", "self_attn.o_proj", "mlp.down_proj"),
    "gpt2": ArchSpec("transformer.h", "attn.c_proj", "mlp.c_proj", conv1d=True),
    "gpt_neox": ArchSpec("gpt_neox.layers", "attention.dense", "mlp.dense_4h_to_h"),
}


def _get(obj, path: str):
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def arch_spec(model: nn.Module) -> ArchSpec:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise CaplocError(
            f"unsupported architecture {model_type!r}: caploc supports {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[model_type]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    return list(_get(model, arch_spec(model).layers))


def attn_out_projs(model: nn.Module) -> list[nn.Module]:
    spec = arch_spec(model)
    return [_get(layer, spec.attn_out) for layer in decoder_layers(model)]


def mlp_down_projs(model: nn.Module) -> list[nn.Module]:
    spec = arch_spec(model)
    return [_get(layer, spec.mlp_down) for layer in decoder_layers(model)]


def head_layout(model: nn.Module) -> HeadLayout:
    arch_spec(model)  # validates the architecture first
    cfg = model.config
    n_layers = cfg.num_hidden_layers
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    in_features = _in_features(attn_out_projs(model)[0], arch_spec(model))
    if in_features != n_heads * head_dim:
        raise CaplocError(
            f"unexpected attention output projection: {in_features} inputs, expected {n_heads}x{head_dim}"
        )
    return HeadLayout(n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim)


def _in_features(proj: nn.Module, spec: ArchSpec) -> int:
    return proj.weight.shape[0] if spec.conv1d else proj.weight.shape[1]


def in_features(proj: nn.Module, model: nn.Module) -> int:
    return _in_features(proj, arch_spec(model))


def neuron_layout(model: nn.Module) -> NeuronLayout:
    """MLP neurons: unit i of layer l is input i of that layer's down projection."""
    down = mlp_down_projs(model)
    return NeuronLayout(n_layers=len(down), n_units=in_features(down[0], model))
