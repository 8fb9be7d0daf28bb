"""Localization methods on a tiny model with planted capability heads, designs, and resumable runs."""

import numpy as np
import pytest

from caploc.api import EvalOptions, TaskSpec, locate
from caploc.errors import ParameterError
from caploc.methods import (DEFAULT_CANDIDATES, DEFAULT_EXCHANGE, DEFAULT_SWAPS, CompressedSensing, Greedy,
                            HyperSearch, OneShotGreedy, ScreenRefine, bernoulli_design, make_method,
                            stratified_design)
from caploc.store import EvalStore
from tiny import PLANTED
from tiny import planted_objective as _objective  # noqa: I001


def _names(lm, indices):
    return {lm.layout.head(i) for i in indices}


@pytest.mark.parametrize("method", [
    OneShotGreedy(),
    Greedy(),
    CompressedSensing("stratified", n_masks=40, sparsity=0.1, seed=0),
    CompressedSensing("bernoulli", n_masks=60, sparsity=0.1, seed=1),
    CompressedSensing("stratified", n_masks=40, sparsity=0.1, alpha=0.001, seed=0),
    HyperSearch(mask_counts=(20, 40), sparsities=(0.05, 0.1), seed=0),
], ids=["1s-greedy", "greedy", "css", "csb", "css-fixed-alpha", "search"])
def test_methods_recover_planted_heads(planted, method):
    lm, _ = planted
    objective = _objective(planted)
    result = method.run(objective, k=3)
    assert _names(lm, result.top(3)) == set(PLANTED)
    assert len(result.ranking) == lm.layout.n_total == len(set(result.ranking))


def test_cs_records_fit_quality_and_coverage(planted):
    result = CompressedSensing("stratified", n_masks=40, sparsity=0.1, seed=0).run(_objective(planted), k=3)
    d = result.details
    assert d["r2"] > 0.5 and d["alpha"] > 0
    assert d["coverage"]["heads_never_ablated"] == 0
    assert d["coverage"]["max_ablations_per_head"] - d["coverage"]["min_ablations_per_head"] <= 1


def test_stratified_design_is_balanced_nested_and_seeded():
    design = stratified_design(100, 270, 0.02, seed=7)
    assert (design.sum(1) == round(0.02 * 270)).all()
    sums = design.sum(0)
    assert sums.max() - sums.min() <= 1
    assert np.array_equal(stratified_design(40, 270, 0.02, seed=7), design[:40])
    assert np.array_equal(stratified_design(100, 270, 0.02, seed=7), design)
    assert not np.array_equal(stratified_design(100, 270, 0.02, seed=8), design)
    b = bernoulli_design(400, 270, 0.05, seed=3)
    assert np.array_equal(b, bernoulli_design(400, 270, 0.05, seed=3))
    assert abs(b.mean() - 0.05) < 0.005


def test_same_seed_same_ranking(planted):
    a = CompressedSensing("bernoulli", n_masks=30, sparsity=0.1, seed=5).run(_objective(planted), k=3)
    b = CompressedSensing("bernoulli", n_masks=30, sparsity=0.1, seed=5).run(_objective(planted), k=3)
    assert a.ranking == b.ranking
    np.testing.assert_array_equal(a.head_scores, b.head_scores)


def test_greedy_reuses_one_shot_sweep_through_the_store(planted, tmp_path):
    store = EvalStore(tmp_path / "evals.sqlite")
    OneShotGreedy().run(_objective(planted, store), k=3)
    objective = _objective(planted, store)
    Greedy().run(objective, k=2)
    n = planted[0].layout.n_total
    # round 1 (n single-head masks) and the baseline come from the store; only round 2 is computed
    assert objective.evaluator.stats.reused == n + 1
    assert objective.evaluator.stats.evaluations == n - 1


class Interrupt(Exception):
    pass


def test_interrupted_run_resumes_without_recomputing(planted, tmp_path, monkeypatch):
    lm, task = planted
    store_path = tmp_path / "evals.sqlite"
    spec, method = TaskSpec(task, n=16, seed=0), make_method("css", n_masks=30, sparsity=0.1)
    kwargs = dict(k=3, evaluation=EvalOptions(store=str(store_path)))
    reference = locate(lm, spec, method, k=3, evaluation=EvalOptions(store=False))

    real_put = EvalStore.put
    calls = {"n": 0}

    def flaky_put(self, key, mask, n_ablated, record):
        real_put(self, key, mask, n_ablated, record)
        calls["n"] += 1
        if calls["n"] == 12:
            raise Interrupt("killed mid-run")

    monkeypatch.setattr(EvalStore, "put", flaky_put)
    with pytest.raises(Interrupt):
        locate(lm, spec, method, **kwargs)
    monkeypatch.setattr(EvalStore, "put", real_put)
    stored = EvalStore(store_path).count()
    assert stored == 12

    resumed = locate(lm, spec, method, out=tmp_path / "run", **kwargs)
    total = reference["budget"]["computed_evaluations"]  # distinct masks of the whole run
    assert EvalStore(store_path).count() == total
    assert resumed["budget"]["reused_evaluations"] == stored
    assert resumed["budget"]["computed_evaluations"] == total - stored
    assert resumed["ranking"] == reference["ranking"]
    assert resumed["heads"] == reference["heads"]

    again = locate(lm, spec, method, **kwargs)
    assert again["budget"]["computed_evaluations"] == 0
    assert again["ranking"] == reference["ranking"]
    assert (tmp_path / "run" / "result.json").exists()


def test_refine_candidates_default_per_screen(planted):
    # AtP is re-taken at every round's ablation and keeps a short list; a regression screen, taken once, a wider one
    assert DEFAULT_CANDIDATES["atp"] < DEFAULT_CANDIDATES["csb"] == DEFAULT_CANDIDATES["css"]
    for screen in ("atp", "csb", "css"):
        method = make_method("refine", screen=screen, n_masks=20, sparsity=0.1)
        assert isinstance(method, ScreenRefine)
        assert method.params()["n_candidates"] is None and method.params()["screen"] == screen
        result = method.run(_objective(planted), k=2)
        assert result.details["n_candidates"] == DEFAULT_CANDIDATES[screen]  # the screen's default, recorded
    assert make_method("refine", screen="csb", n_candidates=5).params()["n_candidates"] == 5


def test_refine_exchange_passes_default_and_are_recorded():
    params = make_method("refine").params()
    assert params["exchange_passes"] == DEFAULT_EXCHANGE > 0 and params["exchange_swaps"] == DEFAULT_SWAPS
    assert make_method("refine", exchange_passes=0).params()["exchange_passes"] == 0
    with pytest.raises(ParameterError, match="exchange"):
        make_method("refine", exchange_passes=-1)
    with pytest.raises(ParameterError, match="method atp does not take n_masks"):
        make_method("atp", n_masks=10)
    with pytest.raises(ParameterError, match="unknown method 'nope'"):
        make_method("nope")
