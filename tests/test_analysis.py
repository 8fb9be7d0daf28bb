"""Specificity, universal heads and run comparison on the planted-heads tiny model."""

import json
from pathlib import Path

import pytest

from caploc import (CaplocError, Criterion, EvalOptions, LocateOptions, TaskSpec, TaskSuite, compare, locate, specificity,
                    universal)
from caploc.experiments.suite import repetition_rate
from caploc.store import EvalStore
from caploc.tasks import get_task
from tiny import PLANTED

FIXTURES = Path(__file__).parent / "fixtures"


def test_repetition_rate():
    assert repetition_rate("the cat sat on the mat") == 0.0
    assert repetition_rate("go go go go go go") == pytest.approx(3 / 4)
    assert repetition_rate("short") == 0.0


def test_universal_flags_only_heads_that_matter_everywhere(planted, tmp_path):
    lm, task = planted
    general = get_task("general", subtask="knowledge")
    user = get_task(str(FIXTURES / "user_target_mini.jsonl"))
    report = universal(lm, TaskSuite([task, general, user], n=6), threshold=0.015, min_tasks=2,
                       evaluation=EvalOptions(store=EvalStore(tmp_path / "s.sqlite")), out=tmp_path / "uni")
    rows = {r["head"]: r for r in report["heads"]}
    assert len(rows) == lm.layout.n_total
    planted_names = {str(h) for h in PLANTED}
    for name, row in rows.items():
        if name not in planted_names:  # zeroed output projections: no effect anywhere, up to fp32 rounding
            # (MKL's AVX-512 kernels round a row differently with the number of rows in its pass: ~1e-7)
            assert all(abs(v) <= 1e-5 for v in row["relative_drop"].values()), name
            assert not row["universal"]
    assert report["universal_heads"] and set(report["universal_heads"]) <= planted_names
    for row in report["heads"]:  # the rule: degrades >= min_tasks tasks by >= threshold
        hits = sum(v >= 0.015 for v in row["relative_drop"].values())
        assert row["tasks_degraded"] == hits and row["universal"] == (hits >= 2)
    assert report["heads"][0]["head"] in planted_names  # sorted by tasks degraded, then drop
    assert report["metrics"] == {"planted": "logprob", "general": "logprob_all", "user_target_mini": "logprob"}
    saved = json.loads((tmp_path / "uni" / "universal.json").read_text())
    assert saved["universal_heads"] == report["universal_heads"]
    # locate --exclude-universal never reports them
    run = locate(lm, TaskSpec(task, n=16), "1s-greedy", k=3, options=LocateOptions(exclude_universal=tmp_path / "uni"),
                 evaluation=EvalOptions(store=EvalStore(tmp_path / "s.sqlite")))
    assert not set(h["head"] for h in run["heads"]) & set(report["universal_heads"])
    assert set(run["excluded_heads"]) == set(report["universal_heads"])


def test_universal_signature_for_generation_tasks(planted, tmp_path):
    lm, _ = planted
    report = universal(lm, TaskSuite("rhyme,general", n=2), candidates="L1H3,L0H0",
                       evaluation=EvalOptions(max_new_tokens=6, store=EvalStore(tmp_path / "s.sqlite")))
    null = next(r for r in report["heads"] if r["head"] == "L0H0")
    assert null["relative_drop"] == {"rhyme": 0.0, "general": 0.0} and not null["universal"]
    sig = next(r for r in report["heads"] if r["head"] == "L1H3")["signature"]["rhyme"]
    assert {"repetition_baseline", "repetition", "baseline", "ablated"} <= set(sig)
    with pytest.raises(CaplocError, match="min_tasks must be between"):
        universal(lm, TaskSuite("general", n=2), candidates="L0H0", min_tasks=2)


def test_specificity_of_planted_heads_and_from_run(planted, tmp_path):
    lm, task = planted
    store = EvalOptions(store=EvalStore(tmp_path / "s.sqlite"))
    heads = ",".join(str(h) for h in PLANTED)
    report = specificity(lm, heads, TaskSuite([task, "general"], n=12), evaluation=store)
    assert report["heads"] == [str(h) for h in PLANTED]
    planted_row = report["tasks"]["planted"]
    assert planted_row["metric"] == "acc" and planted_row["drop"] > 0
    assert report["general"]["tasks"] == ["general"]
    assert set(report["tasks"]["general"]["metrics"]) == {"acc", "acc_norm", "logprob", "logprob_all"}
    # ablating heads that do nothing: zero drop everywhere
    null = specificity(lm, "L0H0,L0H1", TaskSuite([task, "general"], n=12), evaluation=store)
    assert all(r["drop"] == 0 for r in null["tasks"].values())

    # --from a locate run on a user's own task file: its task is rebuilt from the file, on held-out items
    user_file = str(FIXTURES / "user_target_mini.jsonl")
    run_dir = tmp_path / "run"
    locate(lm, TaskSpec(user_file, n=1, n_validate=1), "1s-greedy", k=2, evaluation=store, out=run_dir)
    from_run = specificity(lm, suite=TaskSuite("user_target_mini,general", n=2), from_run=run_dir, evaluation=store)
    assert from_run["heads"] == json.loads((run_dir / "result.json").read_text())["ranking"][:2]
    assert from_run["tasks"]["user_target_mini"]["offset"] == 1
    assert (run_dir / "specificity.json").exists()
    with pytest.raises(CaplocError, match=r"give the heads to ablate \(heads, .*\) or a locate run \(from_run\)"):
        specificity(lm, suite=TaskSuite("general"))


def test_compare_runs(planted, tmp_path):
    lm, task = planted
    store = EvalOptions(store=EvalStore(tmp_path / "s.sqlite"))
    # the planted heads are this model's only live ones and carry the control as well: no control here
    plain = Criterion(control="none")
    locate(lm, TaskSpec(task, n=16), "1s-greedy", k=3, criterion=plain, evaluation=store, out=tmp_path / "a")
    locate(lm, TaskSpec(task, n=16, seed=1), "greedy", k=3, criterion=plain, evaluation=store, out=tmp_path / "b")
    report = compare(tmp_path / "a", tmp_path / "b")
    assert report["overlap"] == 3 and report["jaccard"] == 1.0
    assert set(report["shared"]) == {str(h) for h in PLANTED}
    assert report["spearman"] is not None and report["spearman"] > 0.5
    assert report["spearman_heads"] >= len(PLANTED)  # over the heads both runs scored (NaN elsewhere)
    assert compare(tmp_path / "a", tmp_path / "b", k=1)["k"] == [1, 1]
    with pytest.raises(CaplocError, match="run directory not found"):
        compare(tmp_path / "a", tmp_path / "missing")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "result.json").write_text("{not json")
    with pytest.raises(CaplocError, match="corrupt"):
        compare(tmp_path / "a", tmp_path / "c")
