"""Throughput of the masked evaluator on the embedded model, as ratios measured in one run.

(a) masked evaluator tokens/s  /  plain HF forward tokens/s on the same token sequences
    (both counted in logical tokens: prefix + context + target of every (mask, item) row;
    the evaluator's compute-only rate is printed too, which isolates the hook overhead), and the
    evaluator's computed tokens/s against a plain HF forward over the same rows: the prefix once into HF's
    KV cache, repeated for the rows as HF does, the rows' own tokens scored at the same positions (what the
    computed tokens cost without caploc's masks, shared-prefix attention and layer reuse)
(b) masked evaluator over M different masks  /  seed-code style on the same work: one mask per pass,
    batch size 1, the model reloaded for every ablation (timed on a few masks, scaled to M).
(c) masks/s for a CS batch (random 5-head masks) and for a single-head sweep (one head per mask, a sample
    spread evenly over the layers), each also the copying way (no shared-prefix attention, no layer reuse:
    the evaluator as it was before `evaluator.shortcuts`) in the same run.
(d) generation under masks: rows/s of the evaluator (shared few-shot prefix, rows leave the batch when
    they finish)  /  rows/s of plain `generate()` on the same prompts (2-shot GSM8K-style fixture items).
(e) the roofline, measured in the same run: a timed matmul in the model's dtype, x the model's
    non-embedding parameters (2 FLOPs per parameter per token).

Usage: python bench/eval_throughput.py [--n 50] [--masks 64] [--seed-style-masks 3] [--dtype float32]
       [--device cuda] [--random-weights]
--random-weights builds the model from its config with seeded random weights (the tokenizer and shapes of the
model, none of its weights), for a machine that has the config but not the weights: the rates of a
teacher-forced pass do not depend on the weights' values ((d) then generates random text, mostly to its limit).
(b) needs the weights and is left out then.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from caploc import load_model, wrap_model
from caploc.models import resolve_device, resolve_dtype
from caploc.evaluator import Evaluator
from caploc.evaluator.batches import pad_batch
from caploc.evaluator.runner import returned_cache
from caploc.evaluator.shortcuts import Shortcuts, set_shortcuts, shortcuts
from caploc.sites import head_site
from caploc.tasks import get_task


def synchronize(device):
    """Wait for an accelerator's queued work, so that a timer read after it counts that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def full_sequences(evaluator):
    return [list(s.prefix) + s.context + s.continuation[:-1] for s in evaluator.requests.sequences]


def matmul_flops(dtype, device, repeats=20):
    size = 8192 if device.type == "cuda" else 1024  # large enough to run at the accelerator's rate
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size ** 3 * repeats / (time.perf_counter() - start)


@torch.no_grad()
def generation_rates(lm, n_items, max_new_tokens):
    """Rows/s: the evaluator (2 masks, so rows = 2 x items) against plain generate() on the same prompts."""
    from pathlib import Path

    data = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "gsm8k_mini.jsonl"
    task = get_task("gsm8k", data=str(data), shots=2)
    items = task.items(n_items)
    masks = np.zeros((2, lm.layout.n_total), dtype=bool)
    masks[1, :3] = True
    evaluator = Evaluator(lm, task, items, max_new_tokens=max_new_tokens)
    start = time.perf_counter()
    evaluator.evaluate(masks)
    ours = 2 * len(items) / (time.perf_counter() - start)
    tok = lm.tokenizer
    prompts = [tok(i.prefix + i.context)["input_ids"] for i in items]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):], attn[r, width - len(p):] = torch.tensor(p), 1
    ids, attn = ids.to(lm.model.device), attn.to(lm.model.device)
    start = time.perf_counter()
    for _ in range(2):  # the same two passes' worth of rows
        lm.model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens, do_sample=False,
                          pad_token_id=tok.pad_token_id, stop_strings=list(task.stop), tokenizer=tok)
    synchronize(lm.model.device)
    plain = 2 * len(items) / (time.perf_counter() - start)
    return ours, plain


@torch.no_grad()
def plain_forward_rate(model, sequences, rows_per_pass, passes, pad_id):
    """Unhooked HF forward, right padded, same sequences: logical tokens per second."""
    tokens, start = 0, time.perf_counter()
    batch = (sequences * (rows_per_pass // len(sequences) + 1))[:rows_per_pass]
    ids, _ = pad_batch(batch, pad_id)
    ids = ids.to(model.device)
    for _ in range(passes):
        model(input_ids=ids, logits_to_keep=4)
        tokens += sum(len(s) for s in batch)
    synchronize(model.device)
    return tokens / (time.perf_counter() - start)


@torch.no_grad()
def plain_rows_rate(lm, evaluator, rows_per_pass, passes):
    """Unhooked HF forward over the rows the evaluator computes: the shared prefix once into a KV cache,
    repeated for `rows_per_pass` rows, then the rows' own tokens with logits at their scored positions only
    (right padded); computed tokens (prefix + rows) per second."""
    seqs = evaluator.requests.sequences
    prefix = seqs[0].prefix
    batch = (seqs * (rows_per_pass // len(seqs) + 1))[:rows_per_pass]
    inputs = [s.context + s.continuation[:-1] for s in batch]
    device = lm.model.device
    ids, _ = pad_batch(inputs, lm.tokenizer.pad_token_id)
    ids = ids.to(device)
    width = ids.shape[1]
    keep = torch.arange(min(len(s.context) for s in batch) - 1, width, device=device)
    positions = (torch.arange(width, device=device) + len(prefix))[None].expand(len(batch), -1)
    tokens, start = 0, time.perf_counter()
    for _ in range(passes):
        cache = returned_cache(lm.model(input_ids=torch.tensor([list(prefix)], device=device), use_cache=True,
                                         logits_to_keep=1))
        cache.batch_repeat_interleave(len(batch))
        lm.model(input_ids=ids, position_ids=positions, use_cache=True, logits_to_keep=keep,
                 **{evaluator.scorer.cache_name: cache})  # the argument's name in this transformers
        tokens += len(prefix) + sum(map(len, inputs))
    synchronize(device)
    return tokens / (time.perf_counter() - start)


def masks_per_second(lm, task, items, masks) -> float:
    """A fresh evaluator over `masks`, timed after its baseline (which also computes the one-off unablated
    states that layer reuse starts from, as every method's first call does)."""
    evaluator = Evaluator(lm, task, items)
    evaluator.baseline()
    start = time.perf_counter()
    evaluator.evaluate(masks)
    return len(masks) / (time.perf_counter() - start)


def seed_style_seconds_per_mask(spec, dtype, device, task, items, heads_per_mask, masks):
    """The reference implementation's loop: reload, ablate by weights, one item at a time, batch size 1."""
    times = []
    for m in range(masks):
        start = time.perf_counter()
        lm = load_model(spec, dtype=dtype, device=device)
        rng = np.random.default_rng(m)
        heads = [lm.layout.head(int(i)) for i in rng.choice(lm.layout.n_total, heads_per_mask, replace=False)]
        head_site(lm.model).zero_columns(heads)
        tok = lm.tokenizer
        with torch.no_grad():
            for item in items:
                prompt = tok(item.prefix + item.context)["input_ids"]
                full = tok(item.prefix + item.context + item.target)["input_ids"]
                logits = lm.model(torch.tensor([full], device=lm.model.device)).logits[0, len(prompt) - 1:-1]
                _ = bool((logits.argmax(-1).cpu() == torch.tensor(full[len(prompt):])).all())
        times.append(time.perf_counter() - start)
    return float(np.mean(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--masks", type=int, default=64)
    parser.add_argument("--heads-per-mask", type=int, default=5)
    parser.add_argument("--seed-style-masks", type=int, default=3)
    parser.add_argument("--dtype", default="auto")  # caploc's default: bf16 where the CPU runs it natively
    parser.add_argument("--device", default="auto")
    parser.add_argument("--random-weights", action="store_true", help="the model's config and tokenizer (a "
                        "local model directory) with seeded random weights: see the module's docstring")
    parser.add_argument("--sweep-masks", type=int, default=60, help="single-head masks timed (of 270), spread "
                        "evenly over the layers")
    parser.add_argument("--gen-items", type=int, default=6)
    parser.add_argument("--gen-tokens", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)

    if args.random_weights:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        device = resolve_device(args.device)
        config = AutoConfig.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(args.dtype, device))
        lm = wrap_model(model.to(device), AutoTokenizer.from_pretrained(args.model), spec=args.model)
        args.seed_style_masks = 0
    else:
        lm = load_model(args.model, dtype=args.dtype, device=args.device)
    device = lm.model.device
    task = get_task("arithmetic", subtask="2D+", shots=3)
    items = task.items(args.n, seed=0)
    evaluator = Evaluator(lm, task, items)
    rng = np.random.default_rng(0)
    masks = np.zeros((args.masks, lm.layout.n_total), dtype=bool)
    for row in masks:
        row[rng.choice(lm.layout.n_total, args.heads_per_mask, replace=False)] = True
    evaluator.evaluate(masks[:1])  # warm-up
    evaluator.stats.tokens = 0
    start = time.perf_counter()
    evaluator.evaluate(masks[1:])
    eval_seconds = time.perf_counter() - start
    sequences = full_sequences(evaluator)
    logical_tokens = (args.masks - 1) * sum(len(s) for s in sequences)
    eval_rate = logical_tokens / eval_seconds
    compute_rate = evaluator.stats.tokens / eval_seconds
    plain_rate = plain_forward_rate(lm.model, sequences, rows_per_pass=len(sequences), passes=4,
                                    pad_id=lm.tokenizer.pad_token_id)
    # the same rows as one of the evaluator's passes holds (masks per pass x items), as many passes
    per_pass = evaluator.scorer.masks_per_pass(evaluator.requests)
    rows_rate = plain_rows_rate(lm, evaluator, per_pass * len(items), passes=max(1, (args.masks - 1) // per_pass))
    evaluator_per_mask = eval_seconds / (args.masks - 1)
    chosen = np.linspace(0, lm.layout.n_total - 1, args.sweep_masks).round().astype(int)
    sweep_masks = np.eye(lm.layout.n_total, dtype=bool)[chosen]
    sweep_rate = masks_per_second(lm, task, items, sweep_masks)
    support = shortcuts(lm)
    set_shortcuts(lm, Shortcuts(False, False, "the copying way, for comparison"))
    copying_sweep_rate = masks_per_second(lm, task, items, sweep_masks)
    copying_cs_rate = masks_per_second(lm, task, items, masks[1:])
    set_shortcuts(lm, support)
    gen_ours, gen_plain = generation_rates(lm, args.gen_items, args.gen_tokens)
    flops = matmul_flops(lm.dtype, device)
    params = sum(p.numel() for n, p in lm.model.named_parameters() if "embed" not in n and "lm_head" not in n)
    roofline = flops / (2 * params)
    seed_per_mask = seed_style_seconds_per_mask(args.model, args.dtype, args.device, task, items,
                                                args.heads_per_mask, args.seed_style_masks) \
        if args.seed_style_masks else None

    weights = ", random weights" if args.random_weights else ""
    print(f"model {args.model} ({args.dtype}{weights}, {device}), task arithmetic 2D+ 3-shot, {args.n} items, "
          f"{args.masks} masks of {args.heads_per_mask} heads, torch threads {torch.get_num_threads()}")
    print(f"plain HF forward:          {plain_rate:10.0f} tokens/s")
    print(f"masked evaluator:          {eval_rate:10.0f} logical tokens/s "
          f"({compute_rate:.0f} tokens/s actually computed; prefix reuse skips the rest)")
    print(f"(a) evaluator / plain forward tokens/s:           {eval_rate / plain_rate:6.2f}x  (goal >= 0.9)")
    print(f"    same, computed tokens only:                   {compute_rate / plain_rate:6.2f}x")
    print(f"    computed tokens vs a plain HF forward over the same rows (prefix once, HF's KV cache): "
          f"{compute_rate / rows_rate:.2f}x ({rows_rate:.0f} tokens/s)")
    if seed_per_mask is not None:
        print(f"evaluator: {evaluator_per_mask:.2f} s per mask; seed-code style: {seed_per_mask:.2f} s per mask "
              f"(timed on {args.seed_style_masks} masks)")
        print(f"(b) {args.masks} masks, evaluator vs seed-code style: {seed_per_mask / evaluator_per_mask:6.1f}x  "
              f"(goal >= 20x)")
    print(f"(c) masks/s: CS batch ({args.heads_per_mask}-head masks) {1 / evaluator_per_mask:.2f} "
          f"(copying way {copying_cs_rate:.2f}: {1 / evaluator_per_mask / copying_cs_rate:.2f}x), single-head sweep "
          f"{sweep_rate:.2f} (copying way {copying_sweep_rate:.2f}: {sweep_rate / copying_sweep_rate:.2f}x; "
          f"a {lm.layout.n_total}-mask sweep: {lm.layout.n_total / sweep_rate / 60:.1f} min)")
    print(f"    shortcuts on this model: {support}")
    print(f"(d) generation rows/s: evaluator {gen_ours:.2f}, plain generate() {gen_plain:.2f}: "
          f"{gen_ours / gen_plain:.2f}x  (goal >= 0.8x)")
    print(f"(e) roofline: matmul {flops / 1e9:.0f} GFLOP/s in {str(lm.dtype).replace('torch.', '')} -> "
          f"{roofline:.0f} tokens/s for {params / 1e6:.0f}M non-embedding parameters; plain forward at "
          f"{plain_rate / roofline:.2f}x of it, the evaluator's computed tokens at {compute_rate / roofline:.2f}x")


if __name__ == "__main__":
    main()
