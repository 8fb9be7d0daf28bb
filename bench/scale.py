"""Distributed evaluation on this machine: masks/s of one process with every core against Ray actors that split
the cores, as a ratio, and Ray's own overhead per chunk.

- single: one process, torch threads = all cores, `Evaluator.evaluate(masks)`;
- ray: `--workers` actors x (cores / workers) threads each on a local Ray instance, the same masks, a fresh
  evaluator (no store, so everything is computed);
- overhead: the round trip of an empty remote call, and per chunk the driver's wall time from submit to
  result minus the actor's own compute time (scheduling, argument and result transfer).
Scores are checked identical (fp32).

Usage: python bench/scale.py [--masks 32] [--n 20] [--workers 2] [--json bench/scale.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from caploc import load_model
from caploc.evaluator import Evaluator
from caploc.evaluator.distributed import ray_backend
from caploc.tasks import get_task


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--masks", type=int, default=32)
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", default="bench/scale.json")
    args = parser.parse_args()

    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    lm = load_model(args.model, dtype="float32")
    task = get_task("arithmetic", subtask="2D+")
    items = task.items(args.n)
    masks = np.random.default_rng(0).random((args.masks, lm.layout.n_total)) < 0.05
    Evaluator(lm, task, items).evaluate(masks[:2])  # warm-up: first-call allocations
    started = time.perf_counter()
    single = Evaluator(lm, task, items).evaluate(masks)
    single_s = time.perf_counter() - started

    started = time.perf_counter()
    distributed = load_model(args.model, dtype="float32")
    pool = ray_backend(distributed, args.workers, threads=max(1, cores // args.workers))
    startup_s = time.perf_counter() - started
    Evaluator(distributed, task, items, backend=pool).evaluate(masks[:2])  # warm-up on every actor
    import ray

    calls = 50
    started = time.perf_counter()
    for _ in range(calls):
        ray.get(pool.actors[0].ready.remote())
    round_trip_ms = 1000 * (time.perf_counter() - started) / calls
    chunks_before, overhead_before = pool.chunks, pool.overhead_seconds
    started = time.perf_counter()
    sharded = Evaluator(distributed, task, items, backend=pool).evaluate(masks)
    ray_s = time.perf_counter() - started
    chunks = pool.chunks - chunks_before
    identical = all(np.array_equal(single.scores[m], sharded.scores[m]) for m in single.scores)
    # per chunk: the driver's wall time from submitting to having the result, minus the actor's compute time
    overhead_per_chunk_ms = 1000 * (pool.overhead_seconds - overhead_before) / max(chunks, 1)
    result = {
        "model": args.model, "task": "arithmetic 2D+", "items": args.n, "masks": args.masks, "cores": cores,
        "workers": args.workers, "threads_per_worker": pool.threads,
        "single_masks_per_s": args.masks / single_s, "ray_masks_per_s": args.masks / ray_s,
        "ratio_ray_over_single": single_s / ray_s, "ray_startup_s": startup_s, "chunks": chunks,
        "empty_call_round_trip_ms": round_trip_ms,
        "ray_overhead_per_chunk_ms": overhead_per_chunk_ms, "scores_identical": identical,
    }
    print(json.dumps(result, indent=2))
    Path(args.json).write_text(json.dumps(result, indent=2))
    pool.close()


if __name__ == "__main__":
    main()
