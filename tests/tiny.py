"""Tiny random models of every supported architecture, built in memory from transformers configs,
and a byte-level tokenizer, so unit tests need no downloaded weights."""

from __future__ import annotations

import os

import numpy as np
import torch
import transformers as tf

from caploc import arch
from caploc.components import Head
from caploc.sites import head_site
from caploc.tasks.base import Item, TargetTask

# CAPLOC_TEST_DEVICE=cuda puts every tiny model on that device (bench/device_check.sh); the default is the CPU
DEVICE = torch.device(os.environ.get("CAPLOC_TEST_DEVICE", "cpu"))

VOCAB = 260  # 256 bytes + 4 specials

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              initializer_range=0.15, max_position_embeddings=512, tie_word_embeddings=False)


def configs() -> dict:
    return {
        "llama": tf.LlamaConfig(**COMMON, num_key_value_heads=2),
        "qwen2": tf.Qwen2Config(**COMMON, num_key_value_heads=2),
        "qwen3": tf.Qwen3Config(**COMMON, num_key_value_heads=2, head_dim=16),
        "mistral": tf.MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=None),
        "gemma2": tf.Gemma2Config(**COMMON, num_key_value_heads=2, head_dim=16, sliding_window=16),
        "gemma3_text": tf.Gemma3TextConfig(**COMMON, num_key_value_heads=1, head_dim=16, sliding_window=16),
        "gpt2": tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=512,
                              initializer_range=0.15, tie_word_embeddings=False),
        "gpt_neox": tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                     intermediate_size=96, max_position_embeddings=512, initializer_range=0.15,
                                     tie_word_embeddings=False),
    }


ARCHS = list(configs())


def build(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    config = configs()[arch]
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.to(DEVICE).eval()


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(byte_chars))}
    for special in ("<pad>", "<bos>", "<eos>", "<unk>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                      eos_token="<eos>", unk_token="<unk>")
    fast.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<assistant>{% endif %}")
    return fast


PLANTED = [Head(1, 3), Head(2, 5), Head(3, 0)]


def _four_by_eight():
    """The seeded random Llama the planted models start from: 4 layers x 8 heads of dimension 8, 4 KV heads."""
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                            num_attention_heads=8, num_key_value_heads=4, head_dim=8, initializer_range=0.2,
                            tie_word_embeddings=False)
    return tf.AutoModelForCausalLM.from_config(config).eval()


LETTERS = "abcdefghijklmnopqrstuvwxyz"


def planted_model():
    """4 layers x 8 heads; every head's output projection is zero except the planted ones (scaled up),
    so ablating any other head has exactly no effect."""
    model = _four_by_eight()
    head_site(model).zero_columns([h for h in arch.head_layout(model).all_heads() if h not in PLANTED])
    with torch.no_grad():
        for h in PLANTED:
            arch.attn_out_projs(model)[h.layer].weight[:, h.head * 8:(h.head + 1) * 8] *= 4
    return model.to(DEVICE)


class PlantedTask(TargetTask):
    """Targets are the letters the intact model itself prefers: ablating heads that shape the prediction
    lowers their log-probability."""

    name = "planted"

    def __init__(self, model, tokenizer):
        super().__init__()
        letter_ids = [tokenizer.convert_tokens_to_ids(c) for c in LETTERS]
        self.records = []
        rng = np.random.default_rng(0)
        for i in range(64):
            context = "".join(rng.choice(list(LETTERS), 6)) + " ="
            with torch.no_grad():
                ids = torch.tensor([tokenizer(context)["input_ids"]], device=model.device)
                logits = model(ids).logits[0, -1, letter_ids]
            self.records.append(Item(id=str(i), context=context, target=LETTERS[int(logits.argmax())]))

    def pool(self, seed, needed):
        return self.shuffled(self.records, seed, "planted")


def planted_objective(planted, store=None):
    """The planted task's logprob objective on 24 items."""
    from caploc.evaluator import Evaluator
    from caploc.methods import Objective

    lm, task = planted
    return Objective(Evaluator(lm, task, task.items(24, seed=0), store=store), "logprob")


REDUNDANT = (Head(2, 0), Head(2, 1))  # one head's copy of the other: alone each does nothing, together a lot
DECOY = Head(1, 3)  # the largest single head: what one-at-a-time methods take first


def redundant_model():
    """4 layers x 8 heads, every output projection zero but three: REDUNDANT, two identical heads (the same
    queries, keys and values, the same output columns, scaled up so that either alone dominates the residual:
    after the final norm one copy writes what two do), and DECOY, an ordinary head. Ablating either copy costs
    nothing; ablating both removes the answer (planted task: the intact model's own preferences)."""
    model = _four_by_eight()
    head_site(model).zero_columns([h for h in arch.head_layout(model).all_heads() if h not in (*REDUNDANT, DECOY)])
    a, b = REDUNDANT
    with torch.no_grad():
        attention = model.model.layers[a.layer].self_attn
        attention.q_proj.weight[b.head * 8:(b.head + 1) * 8] = attention.q_proj.weight[a.head * 8:(a.head + 1) * 8]
        attention.o_proj.weight[:, a.head * 8:(a.head + 1) * 8] *= 32
        attention.o_proj.weight[:, b.head * 8:(b.head + 1) * 8] = attention.o_proj.weight[:, a.head * 8:(a.head + 1) * 8]
        arch.attn_out_projs(model)[DECOY.layer].weight[:, DECOY.head * 8:(DECOY.head + 1) * 8] *= 2
    return model.to(DEVICE)
