"""Distributed evaluation on Ray: N actors, each holding one model replica, share an `Evaluator`'s masks.

`ray_backend(lm, n)` starts the actors (a local Ray instance, or an existing cluster with `address`) once per
model; an evaluator given it as its backend (`ModelSpec(workers=N)` does that for every command) shards its
mask chunks over the actors with no other change. The driver keeps the store and the progress bar: each chunk's
scores are written as the chunk finishes, so a killed run resumes as a single-process one does. An actor that
dies is replaced (a fresh replica) and its chunk retried; a chunk's scores reach the store only once, from the
attempt that returned them.

One GPU per actor when the model runs on CUDA; on CPUs the cores are split between the actors (`threads`
each). Actors load the model from its spec (the dequantized-model cache makes that fast), so the model must
be one caploc can load by name, path or hub id. Needs the `ray` extra (`pip install 'caploc[ray]'`).
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections import deque

import torch
from torch import nn

from caploc.errors import CaplocError, ParameterError
from caploc.files import content_key
from caploc.models import LoadedModel

MAX_RETRIES = 3  # replacements of one chunk's actor before the run gives up


def _ray():
    try:
        import ray
    except ImportError as exc:
        raise CaplocError("distributed evaluation needs Ray: pip install 'caploc[ray]'") from exc
    return ray


class _Replica:
    """The body of a Ray actor: one model, evaluators rebuilt from their recipes (cached by recipe)."""

    def __init__(self, spec: str, dtype: str, device: str, threads: int | None, env: dict):
        """Loads the model by its spec, with the driver's caploc and HF settings."""
        os.environ.update(env)
        if threads:
            torch.set_num_threads(threads)
        from caploc.models import load_model

        self.lm = load_model(spec, dtype=dtype, device=device)
        self.evaluators: dict[str, object] = {}

    def ready(self) -> int:
        return os.getpid()

    def score(self, key: str, recipe: dict, masks):
        from caploc.evaluator.core import Evaluator

        if key not in self.evaluators:
            self.evaluators[key] = Evaluator(self.lm, **recipe)
        evaluator = self.evaluators[key]
        before, started = evaluator.stats.tokens, time.perf_counter()
        scores, texts = evaluator.score(masks)
        return scores, texts, evaluator.stats.tokens - before, time.perf_counter() - started


class RayBackend:
    """N Ray actors, each a `replica` (default `_Replica`) holding one model."""

    def __init__(self, lm: LoadedModel, n_workers: int, address: str | None = None, threads: int | None = None,
                 dtype: str | None = None, replica: type = _Replica):
        ray = _ray()
        if n_workers < 1:
            raise ParameterError("{workers} must be at least 1", "workers")
        self.ray = ray
        self.spec = lm.spec
        self.dtype = dtype or str(lm.dtype).replace("torch.", "")
        device = next(lm.model.parameters()).device
        self.gpu = device.type == "cuda"
        if not ray.is_initialized():
            for noisy in ("ray", "ray.data"):
                logging.getLogger(noisy).setLevel(logging.ERROR)
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                cpus = os.cpu_count() or 1
                ray.init(num_cpus=max(cpus, n_workers), num_gpus=torch.cuda.device_count() if self.gpu else 0,
                         include_dashboard=False, log_to_driver=False)
        self.threads = threads or (None if self.gpu else max(1, (os.cpu_count() or 1) // n_workers))
        self.env = {k: v for k, v in os.environ.items() if k.startswith(("CAPLOC_", "HF_"))}
        self._actor_class = ray.remote(num_cpus=0 if self.gpu else self.threads, num_gpus=1 if self.gpu else 0,
                                       max_restarts=0)(replica)
        self.device = "cuda" if self.gpu else "cpu"
        self.actors = [self._start() for _ in range(n_workers)]
        ray.get([a.ready.remote() for a in self.actors])
        self.replaced = 0
        self.chunks = 0
        self.overhead_seconds = 0.0  # per chunk: driver-side wall time minus the actor's compute time, summed

    def _start(self):
        return self._actor_class.remote(self.spec, self.dtype, self.device, self.threads, self.env)

    @property
    def size(self) -> int:
        return len(self.actors)

    def describe(self) -> dict:
        return {"backend": "ray", "workers": len(self.actors), "threads_per_worker": self.threads, "gpu": self.gpu,
                "replaced": self.replaced, "chunks": self.chunks, "overhead_seconds": self.overhead_seconds}

    def run(self, evaluator, chunks: list, done) -> None:
        """Evaluate `chunks` ([(rows, Masks)]) on the actors; `done(rows, scores, texts)` on the driver as each
        chunk finishes, in whatever order they finish."""
        ray = self.ray
        recipe = evaluator.recipe
        key = content_key(evaluator.key() | {"batch_tokens": recipe["batch_tokens"]})  # the store's key, and batch
        recipe_ref = ray.put(recipe)
        queue = deque((chunk, 0) for chunk in chunks)
        idle = list(range(len(self.actors)))
        pending: dict = {}
        while queue or pending:
            while queue and idle:
                slot = idle.pop()
                (rows, mask), attempts = queue.popleft()
                ref = self.actors[slot].score.remote(key, recipe_ref, mask)
                pending[ref] = (slot, (rows, mask), attempts, time.perf_counter())
            ready, _ = ray.wait(list(pending), num_returns=1)
            slot, chunk, attempts, submitted = pending.pop(ready[0])
            try:
                scores, texts, tokens, compute = ray.get(ready[0])
            except (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError) as exc:
                if attempts >= MAX_RETRIES:
                    raise CaplocError(f"a Ray worker died {attempts + 1} times on one chunk: {exc}") from exc
                logging.getLogger(__name__).warning("caploc: Ray worker %d died; replacing it and retrying its "
                                                    "chunk", slot)
                self.actors[slot] = self._start()
                self.replaced += 1
                queue.appendleft((chunk, attempts + 1))
                idle.append(slot)
                continue
            evaluator.stats.tokens += tokens
            self.chunks += 1
            self.overhead_seconds += max(0.0, time.perf_counter() - submitted - compute)
            done(chunk[0], scores, texts)
            idle.append(slot)

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []


_pools: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def ray_backend(lm: LoadedModel, workers: int | None = None, address: str | None = None,
                threads: int | None = None, replica: type = _Replica) -> RayBackend:
    """`workers` Ray actors for this model (a local instance, or the cluster at `address`, 'auto' for the one
    this machine belongs to; without `workers`, one actor per GPU or 2 on CPUs), started once per model and
    setting."""
    if workers is None:
        workers = max(1, torch.cuda.device_count()) if next(lm.model.parameters()).is_cuda else 2
    pools = _pools.setdefault(lm.model, {})
    setting = (workers, address, threads, replica)
    if setting not in pools:
        started = time.perf_counter()
        pools[setting] = RayBackend(lm, workers, address, threads, replica=replica)
        logging.getLogger(__name__).info("caploc: %d Ray workers ready in %.1f s", workers,
                                         time.perf_counter() - started)
    return pools[setting]
