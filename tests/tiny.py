"""Tiny random models of every supported architecture, built in memory from transformers configs,
and a byte-level tokenizer, so unit tests need no downloaded weights."""

from __future__ import annotations

import torch
import transformers as tf

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
    return model.eval()


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
