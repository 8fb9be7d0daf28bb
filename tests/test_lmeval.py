"""lm-evaluation-harness both ways, offline: lm-eval tasks from a YAML pointing at local files become caploc
tasks, and caploc is an lm-eval model whose ablation is caploc's own."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lm_eval")

from caploc.evaluator import Evaluator  # noqa: E402
from caploc.tasks import get_task  # noqa: E402

YAMLS = Path(__file__).parent / "fixtures" / "lmeval"
LAYOUTS = Path(__file__).parent / "fixtures" / "layouts"
HEADS = ["L1H4", "L11H7"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _mask(lm, heads):
    mask = np.zeros((1, lm.layout.n_total), dtype=bool)
    mask[0, [lm.layout.index(lm.layout.parse(h)) for h in heads]] = True
    return mask


def test_lmeval_task_is_lm_evals_requests_as_caploc_items():
    task = get_task("lmeval:arc_easy_local", data=str(YAMLS))
    ours = get_task("arc_easy", data=str(LAYOUTS / "arc_easy_hf.jsonl"))
    assert {(i.context, i.choices, i.label) for i in task.items(10)} == \
        {(i.context, i.choices, i.label) for i in ours.items(10)}
    assert task.metric_names()[:2] == ("acc", "acc_norm") and task.identification_metric == "logprob"
    target = get_task("lmeval:lambada_local", data=str(YAMLS))
    assert sorted(i.target for i in target.items(5)) == [" dock", " signs"]


def test_lmeval_task_runs_through_the_evaluator_with_lm_evals_metrics(smollm):
    task = get_task("lmeval:arc_easy_local", data=str(YAMLS))
    items = task.items(3)
    evaluator = Evaluator(smollm, task, items)
    both = evaluator.evaluate(np.vstack([np.zeros((1, smollm.layout.n_total), dtype=bool), _mask(smollm, HEADS)]))
    ours = Evaluator(smollm, get_task("arc_easy", data=str(LAYOUTS / "arc_easy_hf.jsonl")), items)
    reference = ours.evaluate(_mask(smollm, HEADS))
    # the same prompts through the same evaluator: caploc's acc/acc_norm agree with lm-eval's process_results
    np.testing.assert_allclose(both.scores["logprob"][1], reference.scores["logprob"][0], rtol=1e-5)
    np.testing.assert_array_equal(both.scores["acc"][1], reference.scores["acc"][0])
    np.testing.assert_array_equal(both.scores["acc_norm"][1], reference.scores["acc_norm"][0])
    assert not np.allclose(both.scores["logprob"][0], both.scores["logprob"][1])  # the heads matter


def test_caploc_model_loglikelihoods_equal_caplocs_evaluator(smollm):
    from lm_eval.tasks import TaskManager

    from caploc.lmeval import CaplocLM
    from caploc.tasks.harness import LOADED

    model = CaplocLM.create_from_arg_obj({"pretrained": smollm, "ablate": ",".join(HEADS)})
    assert [str(h) for h in model.heads] == HEADS
    cwd = os.getcwd()
    os.chdir(YAMLS)
    try:
        manager = LOADED.get((str(YAMLS.resolve()),)) or TaskManager(include_path=str(YAMLS))
        harness = manager.load(["arc_easy_local"])["tasks"]["arc_easy_local"]
        harness.build_all_requests(rank=0, world_size=1)
    finally:
        os.chdir(cwd)
    results = model.loglikelihood(harness.instances)
    task = get_task("lmeval:arc_easy_local", data=str(YAMLS))
    items = {i.id: i for i in task.items(10)}
    scores = Evaluator(smollm, task, list(items.values())).evaluate(_mask(smollm, HEADS))
    gold = {}
    for instance, (ll, _) in zip(harness.instances, results):
        item = items[f"arc_easy_local/{instance.doc_id}"]
        if instance.idx == item.label:
            gold[item.id] = ll
    expected = [gold[i] for i in scores.item_ids]
    np.testing.assert_allclose(scores.scores["logprob"][0], expected, rtol=1e-4)


def test_caploc_model_from_lm_evals_command_line(smollm, tmp_path):
    """`lm_eval --model caploc --model_args pretrained=...,ablate=L1H4,L11H7` (through caploc.lmeval, which
    registers the model) reports the accuracy caploc's own evaluator gives the ablated model."""
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "caploc.lmeval", "run", "--model", "caploc", "--model_args",
                           f"pretrained=smollm2-135m,dtype=float32,ablate={','.join(HEADS)}",
                           "--tasks", "arc_easy_local", "--include_path", str(YAMLS), "--output_path", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=YAMLS,
                          env=os.environ | {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    import json

    report = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["arc_easy_local"]
    task = get_task("lmeval:arc_easy_local", data=str(YAMLS))
    ours = Evaluator(smollm, task, task.items(10)).evaluate(_mask(smollm, HEADS))
    assert report["acc,none"] == pytest.approx(ours.scores["acc"][0].mean())
    assert report["acc_norm,none"] == pytest.approx(ours.scores["acc_norm"][0].mean())


def test_lmeval_task_in_the_specificity_suite_from_the_cli(smollm, tmp_path):
    """`specificity --tasks general,lmeval:NAME --data lmeval:NAME=DIR`: an lm-eval task is one more row."""
    out = tmp_path / "spec"
    done = subprocess.run([sys.executable, "-m", "caploc", "specificity", "--heads", ",".join(HEADS), "--tasks",
                           "general,lmeval:arc_easy_local", "--data", f"lmeval:arc_easy_local={YAMLS}", "--n", "3",
                           "--out", str(out), "--json"], capture_output=True, text=True, timeout=600,
                          env=os.environ | {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    import json

    rows = json.loads((out / "specificity.json").read_text())["tasks"]
    assert "lmeval:arc_easy_local" in rows and rows["lmeval:arc_easy_local"]["metric"] == "acc"
