"""Distributed evaluation on a local Ray instance: 2 CPU actors x 1 thread, the embedded model."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray")

from caploc import load_model  # noqa: E402
from caploc.cli import main  # noqa: E402
from caploc.evaluator import Evaluator  # noqa: E402
from caploc.evaluator.distributed import _Replica, ray_backend  # noqa: E402
from caploc.store import EvalStore  # noqa: E402
from caploc.tasks import get_task  # noqa: E402

pytestmark = pytest.mark.slow
MARKER = "CAPLOC_TEST_CRASH_MARKER"


class CrashOnce(_Replica):
    """A replica that exits on the first chunk anywhere (the marker file records that one did)."""

    def score(self, key, recipe, masks):
        marker = os.environ[MARKER]
        if not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
        return super().score(key, recipe, masks)


@pytest.fixture(scope="module")
def distributed():
    """A model replica of our own with 2 Ray actors (the session's `smollm` stays single-process); the workers
    can import this module (for CrashOnce)."""
    import ray

    path = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    # logical CPUs to spare: the fixture's 2 actors, a crashed one's replacement and the 2 a `--workers 2` locate
    # starts in this process
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    lm = load_model("smollm2-135m", dtype="float32")
    backend = ray_backend(lm, 2, threads=1)
    yield lm, backend
    backend.close()
    ray.shutdown()


def _masks(lm, n=8, seed=0):
    return np.random.default_rng(seed).random((n, lm.layout.n_total)) < 0.05


def test_sharded_scores_equal_the_single_process_evaluator(smollm, distributed):
    lm, backend = distributed
    task = get_task("arithmetic", subtask="2D+")
    items = task.items(6)
    masks = _masks(smollm)
    single = Evaluator(smollm, task, items).evaluate(masks)
    sharded = Evaluator(lm, task, items, backend=backend).evaluate(masks)
    for metric in single.scores:
        np.testing.assert_array_equal(sharded.scores[metric], single.scores[metric])  # fp32: exact
    assert backend.chunks >= 2  # the masks really were split between the actors
    # generation tasks shard too
    gen = get_task("gsm8k", data=os.path.join(os.path.dirname(__file__), "fixtures", "gsm8k_mini.jsonl"), shots=1)
    gen_items = gen.items(2)
    a = Evaluator(smollm, gen, gen_items, max_new_tokens=12).evaluate(masks[:2])
    b = Evaluator(lm, gen, gen_items, max_new_tokens=12, backend=backend).evaluate(masks[:2])
    assert a.texts == b.texts


def test_an_actor_that_dies_mid_run_is_replaced_and_nothing_is_lost_or_stored_twice(smollm, distributed, tmp_path):
    import ray

    lm, backend = distributed
    crashing = ray.remote(num_cpus=backend.threads, max_restarts=0)(CrashOnce)
    marker = tmp_path / "crashed"
    backend.actors[0] = crashing.remote(backend.spec, backend.dtype, backend.device, backend.threads,
                                        backend.env | {MARKER: str(marker)})
    replaced = backend.replaced
    task = get_task("arithmetic", subtask="3D+")
    items = task.items(5)
    masks = _masks(smollm, 10, seed=1)
    store = EvalStore(tmp_path / "store.sqlite")
    evaluator = Evaluator(lm, task, items, store=store, backend=backend)
    sharded = evaluator.evaluate(masks)
    assert marker.exists() and backend.replaced == replaced + 1
    single = Evaluator(smollm, task, items).evaluate(masks)
    for metric in single.scores:
        np.testing.assert_array_equal(sharded.scores[metric], single.scores[metric])
    assert store.count(evaluator.key()) == len({m.tobytes() for m in masks})
    # a rerun is answered from the store: no chunk goes to the actors
    chunks = backend.chunks
    again = Evaluator(lm, task, items, store=store, backend=backend).evaluate(masks)
    assert backend.chunks == chunks and np.array_equal(again.scores["logprob"], sharded.scores["logprob"])


def test_locate_with_two_workers_gives_the_same_heads(distributed, tmp_path):
    """The command line, in this process, once in it and once over 2 Ray workers."""
    def run(*extra):
        out = tmp_path / ("workers" if extra else "single")
        # the default method (AtP screen, exact refine) with the general control, kept small
        main(["locate", "--task", "arithmetic", "--subtask", "2D+", "--dtype", "float32", "--n", "4",
              "--n-validate", "4", "--n-control", "2", "--k", "2", "--candidates", "4", "--bootstrap", "20",
              "--store", str(out / "store.sqlite"), "--out", str(out), "--quiet", *extra])
        return json.loads((out / "result.json").read_text())

    single, sharded = run(), run("--workers", "2")
    assert sharded["ranking"][:2] == single["ranking"][:2]
    # the same numbers up to fp32 rounding: the workers' chunks batch the masks differently, and on some CPUs
    # (an Intel Xeon with AMX here) a row's scores then differ in the 7th digit
    assert _numbers(sharded["validation"]) == pytest.approx(_numbers(single["validation"]), rel=1e-5, abs=1e-6)


def _numbers(tree, path="") -> dict:
    """A nested result as {path: number}, so that its structure must match exactly and its numbers closely."""
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _numbers(value, f"{path}/{key}").items()}
    if isinstance(tree, list):
        return {k: v for i, value in enumerate(tree) for k, v in _numbers(value, f"{path}/{i}").items()}
    return {path: tree}
