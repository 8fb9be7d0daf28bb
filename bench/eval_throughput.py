"""Throughput of the masked evaluator on the embedded model, as ratios measured in one run.

(a) masked evaluator tokens/s  /  plain HF forward tokens/s on the same token sequences
    (both counted in logical tokens: prefix + context + target of every (mask, item) row;
    the evaluator's compute-only rate is printed too, which isolates the hook overhead)
(b) masked evaluator over M different masks  /  seed-code style on the same work: one mask per pass,
    batch size 1, the model reloaded for every ablation (timed on a few masks, scaled to M).

Usage: python bench/eval_throughput.py [--n 50] [--masks 64] [--seed-style-masks 3] [--dtype float32]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from caploc import load_model
from caploc.evaluator import Evaluator
from caploc.sites import head_site
from caploc.tasks import get_task


def full_sequences(evaluator):
    return [list(s.prefix) + s.context + s.continuation[:-1] for s in evaluator._sequences]


@torch.no_grad()
def plain_forward_rate(model, sequences, rows_per_pass, passes, pad_id):
    """Unhooked HF forward, right padded, same sequences: logical tokens per second."""
    tokens, start = 0, time.perf_counter()
    batch = (sequences * (rows_per_pass // len(sequences) + 1))[:rows_per_pass]
    width = max(len(s) for s in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    for r, s in enumerate(batch):
        ids[r, : len(s)] = torch.tensor(s)
    for _ in range(passes):
        model(input_ids=ids, logits_to_keep=4)
        tokens += sum(len(s) for s in batch)
    return tokens / (time.perf_counter() - start)


def seed_style_seconds_per_mask(spec, dtype, task, items, heads_per_mask, masks):
    """The reference implementation's loop: reload, ablate by weights, one item at a time, batch size 1."""
    times = []
    for m in range(masks):
        start = time.perf_counter()
        lm = load_model(spec, dtype=dtype)
        rng = np.random.default_rng(m)
        heads = [lm.layout.head(int(i)) for i in rng.choice(lm.layout.n_total, heads_per_mask, replace=False)]
        head_site(lm.model).zero_columns(heads)
        tok = lm.tokenizer
        with torch.no_grad():
            for item in items:
                prompt = tok(item.prefix + item.context)["input_ids"]
                full = tok(item.prefix + item.context + item.target)["input_ids"]
                logits = lm.model(torch.tensor([full])).logits[0, len(prompt) - 1:-1]
                _ = (logits.argmax(-1) == torch.tensor(full[len(prompt):])).all()
        times.append(time.perf_counter() - start)
    return float(np.mean(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--masks", type=int, default=64)
    parser.add_argument("--heads-per-mask", type=int, default=5)
    parser.add_argument("--seed-style-masks", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    torch.manual_seed(0)

    lm = load_model(args.model, dtype=args.dtype)
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
    evaluator_per_mask = eval_seconds / (args.masks - 1)
    seed_per_mask = seed_style_seconds_per_mask(args.model, args.dtype, task, items, args.heads_per_mask,
                                                args.seed_style_masks)

    print(f"model {args.model} ({args.dtype}), task arithmetic 2D+ 3-shot, {args.n} items, "
          f"{args.masks} masks of {args.heads_per_mask} heads, torch threads {torch.get_num_threads()}")
    print(f"plain HF forward:          {plain_rate:10.0f} tokens/s")
    print(f"masked evaluator:          {eval_rate:10.0f} logical tokens/s "
          f"({compute_rate:.0f} tokens/s actually computed; prefix reuse skips the rest)")
    print(f"(a) evaluator / plain forward tokens/s:           {eval_rate / plain_rate:6.2f}x  (goal >= 0.9)")
    print(f"    same, computed tokens only (hook overhead):   {compute_rate / plain_rate:6.2f}x")
    print(f"evaluator: {evaluator_per_mask:.2f} s per mask; seed-code style: {seed_per_mask:.2f} s per mask "
          f"(timed on {args.seed_style_masks} masks)")
    print(f"(b) {args.masks} masks, evaluator vs seed-code style: {seed_per_mask / evaluator_per_mask:6.1f}x  "
          f"(goal >= 20x)")


if __name__ == "__main__":
    main()
