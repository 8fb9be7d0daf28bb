"""Joint search for head groups no one-head-at-a-time method reaches: a planted redundant pair, gates that are
exact ablation at 0 and 1, `--k auto`, and replays."""

import numpy as np
import pytest

from caploc import Criterion, EvalOptions, LocateOptions, TaskSpec, locate
from caploc.evaluator import Evaluator
from caploc.methods import AttributionPatching, Greedy, JointSearch, Objective, make_method
from caploc.methods.joint import project_capped_simplex
from tiny import DECOY, DEVICE, PLANTED, REDUNDANT


def _objective(redundant, controls=()):
    lm, task = redundant
    return Objective(Evaluator(lm, task, task.items(24, seed=0)), "logprob",
                     [Evaluator(lm, t, t.items(8, seed=0)) for t in controls])


def test_the_planted_pair_is_redundant(redundant):
    lm, _ = redundant
    a, b = (lm.layout.index(h) for h in REDUNDANT)
    drops = _objective(redundant).drops(_objective(redundant).set_masks([[a], [b], [a, b],
                                                                         [lm.layout.index(DECOY)]]))
    assert abs(drops[0]) < 0.1 and abs(drops[1]) < 0.1  # alone: nothing
    assert drops[2] > 2.0 and drops[2] > drops[3] + 1.0  # together: more than the best single head


def test_joint_finds_the_pair_that_greedy_atp_and_refine_alone_miss(redundant):
    lm, _ = redundant
    pair = {lm.layout.index(h) for h in REDUNDANT}
    joint = JointSearch(layers=2, layer_challenge=False).run(_objective(redundant), 2)
    assert set(joint.top(2)) == pair
    assert joint.details["elimination"][-1]["heads"] == sorted(pair, key=joint.top(2).index)
    assert set(Greedy().run(_objective(redundant), 2).top(2)) != pair
    assert set(AttributionPatching().run(_objective(redundant), 2).top(2)) != pair
    assert set(make_method("refine", layer_challenge=False).run(_objective(redundant), 2).top(2)) != pair


def test_without_the_layer_screen_the_pair_comes_from_the_layer_challenge(redundant):
    """`layers=0`: each head of the pair alone is flat, so the gates never move it and elimination never sees
    it; the layer challenge, testing the pair's layer against the set found, brings it in."""
    lm, _ = redundant
    pair = {lm.layout.index(h) for h in REDUNDANT}
    assert set(JointSearch(layers=0, layer_challenge=False).run(_objective(redundant), 2).top(2)) != pair
    run = JointSearch(layers=0).run(_objective(redundant), 2)
    assert set(run.top(2)) == pair and set(run.details["layer_challenge"]["set"]) == pair
    assert run.details["layer_criterion"] == [] and not set(run.details["pool"]) >= pair


def test_a_screened_layer_pruned_at_that_layer_ablated_keeps_the_pair(redundant):
    """`layer_keep`: the pair's layer (8 heads) is pruned by the gradient with that layer ablated, where
    restoring either copy brings the answer back, so the pair's heads are the two it keeps; the other six never
    join the pool."""
    lm, _ = redundant
    pair = {lm.layout.index(h) for h in REDUNDANT}
    run = JointSearch(layers=1, layer_keep=2, steps=0, layer_challenge=False).run(_objective(redundant), 2)
    layer = {lm.layout.index(h) for h in lm.layout.all_heads() if h.layer == REDUNDANT[0].layer}
    assert set(run.top(2)) == pair
    assert set(run.details["pool"]) & layer == pair
    assert {r["layer"] for r in run.details["layer_pruning"]} == {REDUNDANT[0].layer}
    assert run.details["gradient_points"] == 1 + len(run.details["layer_pruning"]) + len(run.details["pruning"]) \
        + len(run.details["exchanges"])


def test_the_layer_challenge_gives_refine_the_pair(redundant):
    """The pair shares a layer: that layer ablated whole beats greedy's set, and elimination narrows it to the
    pair; the challenge's record says so."""
    lm, _ = redundant
    pair = {lm.layout.index(h) for h in REDUNDANT}
    run = make_method("refine").run(_objective(redundant), 2)
    challenge = run.details["layer_challenge"]
    assert set(run.top(2)) == pair and set(challenge["set"]) == pair
    assert challenge["challengers"][0] == REDUNDANT[0].layer and challenge["support"] >= 0.95
    assert challenge["criterion"] > challenge["criterion_before"] + 1.0


def test_a_losing_challenger_polished_by_one_swap_replaces_the_set(redundant, monkeypatch):
    """Elimination can keep a head whose layer-mate does the job (here forced: one copy of the pair and a dead
    head of its layer); that challenger loses to the decoy's set, and one exchange pass on it swaps the dead
    head for the other copy, after which it wins. Without the polish the set stands."""
    from caploc.methods import groups

    lm, _ = redundant
    a, b = (lm.layout.index(h) for h in REDUNDANT)
    dead = lm.layout.index(type(REDUNDANT[0])(REDUNDANT[0].layer, 5))
    real = groups.eliminate

    def keeps_a_dead_head(objective, group, k):
        chosen, curve = real(objective, group, k)
        wrong = [dead if h == b else h for h in chosen]
        drop = float(objective.drops(objective.set_masks([wrong]))[0])
        return wrong, curve + [{"size": k, "heads": wrong, "criterion": groups.set_criterion(objective, drop, None),
                                "target_drop": drop}]

    monkeypatch.setattr(groups, "eliminate", keeps_a_dead_head)
    objective = _objective(redundant)
    decoy_set = [lm.layout.index(DECOY), dead]
    drop = float(objective.drops(objective.set_masks([decoy_set]))[0])
    kept, _, _, unpolished = groups.challenge_layers(objective, decoy_set, drop, None)
    assert kept == decoy_set and unpolished["set"] is None and "polish" not in unpolished
    won, won_drop, _, record = groups.challenge_layers(objective, decoy_set, drop, None, polish_swaps=8)
    assert set(won) == {a, b} and record["set"] == won and record["polish"][0]["swap"] == [dead, b]
    assert record["support"] >= 0.95 and won_drop > drop + 1.0
    assert record["gradient_points"] == unpolished["gradient_points"] + 1  # the polish's one gradient


def test_bootstrap_replays_of_the_layer_challenge_read_only_what_the_run_stored(redundant):
    """Replays resample the items, so their gradient pruning can pick a group the run never evaluated: the run's
    set then stands in that replay (no model call, no error); the pair is still chosen in most of them."""
    lm, task = redundant
    run = locate(lm, TaskSpec(task, n=16, n_validate=8), make_method("refine"), k=2,
                 criterion=Criterion(control="none"), options=LocateOptions(bootstrap=8),
                 evaluation=EvalOptions(store=False))
    assert {h["head"] for h in run.heads} == {str(h) for h in REDUNDANT}
    assert all(h["selection_frequency"] >= 0.5 for h in run.heads)


def test_a_replay_whose_pruning_leaves_the_run_s_path_keeps_its_set(redundant, monkeypatch):
    """The case the replays above can meet on real models: the resampled gradient prunes the layer to a group
    the run never evaluated; that challenger is skipped, nothing is computed."""
    from caploc.methods import groups

    lm, _ = redundant
    objective = _objective(redundant)
    run = make_method("refine").run(objective, 2)
    replay = objective.resampled(np.random.default_rng(0))
    layer = REDUNDANT[0].layer * lm.layout.n_heads
    monkeypatch.setattr(groups, "prune", lambda o, group, size: (list(range(layer + 3, layer + 3 + size)), []))
    before = objective.evaluator.stats.evaluations
    chosen, _, _, record = groups.challenge_layers(replay, [0, 1], 0.0, None)
    assert chosen == [0, 1] and record["set"] is None and run.details["layer_challenge"]["set"]
    assert objective.evaluator.stats.evaluations == before


def test_joint_replays_redo_the_layer_challenge_from_what_the_run_evaluated(redundant):
    """The default pool (no layer screen) misses the pair and the layer challenge brings it, so a replay that
    stopped at the elimination would never report it; replays rerun the challenge and the exchange on the
    run's stored scores and gradients, and call the model for none (a point the run never reached raises
    NotEvaluated and that option is skipped)."""
    lm, _ = redundant
    pair = {lm.layout.index(h) for h in REDUNDANT}
    objective = _objective(redundant)
    method = JointSearch()
    run = method.run(objective, 2)
    assert set(run.top(2)) == pair and set(run.details["layer_challenge"]["set"]) == pair
    evaluator = objective.evaluator
    before = (evaluator.stats.evaluations, evaluator.stats.gradient_tokens)
    replay = method.for_replay(run.details)
    tops = [set(replay.run(objective.resampled(np.random.default_rng(seed)), 2).top(2)) for seed in range(8)]
    assert (evaluator.stats.evaluations, evaluator.stats.gradient_tokens) == before
    assert sum(top == pair for top in tops) >= 6


def test_the_layer_challenge_keeps_a_set_no_layer_beats(planted):
    """The planted heads sit in three layers: no layer ablated whole reaches the three of them, so the set
    stands, and the challenge cost only the layer masks (no elimination)."""
    lm, task = planted
    objective = Objective(Evaluator(lm, task, task.items(24, seed=0)), "logprob")
    run = make_method("refine").run(objective, 3)
    assert set(run.top(3)) == {lm.layout.index(h) for h in PLANTED}
    challenge = run.details["layer_challenge"]
    assert challenge["set"] is None and challenge["challengers"] == [] and challenge["gradient_points"] == 0
    assert len(challenge["layer_criterion"]) == lm.layout.n_layers


def test_the_first_look_rules_out_only_layers_that_cannot_beat_the_set(redundant, monkeypatch):
    """Layer masks are scored on the leading third of the items first; the layers with no effect there are not
    scored on every item (their criterion stays NaN), the pair's layer is, and the challenge decides what it
    decides when every layer is scored in full (with more than half the items needed for a first look, none
    is taken)."""
    from caploc.methods import groups

    lm, _ = redundant
    pair = {lm.layout.index(h) for h in REDUNDANT}
    looked = _objective(redundant)
    run = make_method("refine").run(looked, 2)
    challenge = run.details["layer_challenge"]
    first = challenge["first_look"]
    assert first["items"] == 8 and REDUNDANT[0].layer not in first["ruled_out"]
    # layers 0 and 3 change nothing: exactly 0 on the CPU; on a GPU, batch-shape rounding (1e-7) can keep them in
    no_effect = [first["estimate"][0], first["estimate"][3]]
    assert first["ruled_out"] == [0, 3] or DEVICE.type != "cpu" and max(map(abs, no_effect)) < 1e-5
    assert all(np.isnan(challenge["layer_criterion"][layer]) for layer in first["ruled_out"])
    assert looked.first_look_tokens > 0
    monkeypatch.setattr(groups, "FIRST_LOOK_ITEMS", 13)
    full = _objective(redundant)
    unscreened = make_method("refine").run(full, 2)
    assert set(run.top(2)) == set(unscreened.top(2)) == pair
    assert challenge["challengers"] == unscreened.details["layer_challenge"]["challengers"]
    assert "first_look" not in unscreened.details["layer_challenge"] and full.first_look_tokens == 0
    assert full.requested == looked.requested + len(first["ruled_out"])


def test_no_first_look_at_a_count(redundant):
    """A score without a gradient (accuracy here) is a count: a few unchanged items say little about the rest,
    so every layer is scored in full."""
    lm, task = redundant
    objective = Objective(Evaluator(lm, task, task.items(24, seed=0)), "acc")
    masks = objective.set_masks([[0], [1]])
    assert objective.first_look(masks, 8) is None and objective.first_look_tokens == 0


def test_a_resample_reads_the_run_s_gradients_and_computes_none(redundant):
    """At a point the run took, a resample's gradient is the run's per-item gradients under the resample's
    weights; at any other point it raises NotEvaluated instead of calling the model."""
    from caploc.methods import NotEvaluated

    objective = _objective(redundant)
    at = np.ones(objective.n_components)
    at[:3] = 0.0
    objective.gradients_at(at)
    resample = objective.resampled(np.random.default_rng(0))
    before = objective.evaluator.stats.gradient_tokens
    gradient, _, _ = resample.gradients_at(at)
    grads, _, _ = objective.item_gradients_at(at)
    weights = resample.weights[0]
    np.testing.assert_allclose(gradient, (weights[:, None] * grads).sum(0) / weights.sum())
    with pytest.raises(NotEvaluated):
        resample.gradients_at(np.ones(objective.n_components))
    assert objective.evaluator.stats.gradient_tokens == before


def test_gates_at_exactly_zero_and_one_are_exact_ablation(redundant):
    lm, task = redundant
    evaluator = Evaluator(lm, task, task.items(6, seed=1))
    rng = np.random.default_rng(0)
    masks = rng.random((3, lm.layout.n_total)) < 0.3
    exact = evaluator.evaluate(masks).scores["logprob"]
    for mask, scores in zip(masks, exact):
        _, at_gates = evaluator.gradients_and_scores("logprob", multipliers=(~mask).astype(float))
        np.testing.assert_allclose(at_gates, scores, atol=1e-5)


def test_k_auto_keeps_the_smallest_set_that_removes_most_of_the_group(redundant):
    """The pool misses the pair, so its own auto set is the decoy alone; the layer challenge, put to the pool's
    5-head set, brings the pair's layer, and the auto rule on that layer's curve keeps the pair."""
    lm, task = redundant
    run = locate(lm, TaskSpec(task, n=16, n_validate=8), "joint", k="auto", criterion=Criterion(control="none"),
                 options=LocateOptions(bootstrap=5), evaluation=EvalOptions(store=False))
    assert run.details["elimination"][-1]["heads"] == [lm.layout.index(DECOY)]
    challenge = run.details["layer_challenge"]
    assert challenge["set"] and len(challenge["proposed"]) == 5
    curve = challenge["elimination"]
    assert run.k == run.details["k"] == len(run.heads) and run.extra["k_asked"] == "auto"
    keep = 0.9 * curve[0]["target_drop"]
    smallest = min(c["size"] for c in curve if c["target_drop"] >= keep)
    assert run.k == smallest and {h["head"] for h in run.heads} >= {str(h) for h in REDUNDANT}
    assert len(run.stability["selection_frequency"]) == lm.layout.n_total  # replays ran on the stored scores
    with pytest.raises(Exception, match="k auto needs a method that chooses the size"):
        locate(lm, TaskSpec(task, n=4), "atp", k="auto", evaluation=EvalOptions(store=False))


def test_the_capped_simplex_projection():
    s = np.array([0.9, 0.8, 0.5, 0.1, -0.2, 1.4])
    p = project_capped_simplex(s, 2.0)
    assert abs(p.sum() - 2.0) < 1e-9 and p.min() >= 0 and p.max() <= 1
    assert list(np.argsort(-p)[:3]) == [5, 0, 1]
    np.testing.assert_allclose(project_capped_simplex(np.array([0.2, 0.3]), 2.0), [0.2, 0.3])


def test_a_replay_s_elimination_stops_where_the_run_scored_no_option_s_control(redundant):
    """A replay whose elimination reaches options the run scored on the target but not on the control stops
    there, its set's criterion known, instead of taking an option of unknown criterion (which the layer
    challenge's support test could then not score)."""
    from caploc.methods import groups

    lm, task = redundant
    objective = _objective(redundant, controls=(task,))
    group = list(range(lm.layout.n_heads))
    objective.responses(objective.set_masks([group]))
    objective.drops(objective.set_masks([[h for h in group if h != out] for out in group]))  # targets only
    chosen, curve = groups.eliminate(objective.resampled(np.random.default_rng(0)), group, 2)
    assert chosen == group and len(curve) == 1 and np.isfinite(curve[0]["criterion"])


def test_the_layer_challenge_scores_a_cheaper_control_first_and_skips_targets_it_rules_out(redundant, monkeypatch):
    """Where the control costs fewer tokens per mask than the target, a layer mask's control is scored first,
    and its target only when its criterion could still beat the set with the whole target removed (a target
    share of 1). Here the control is the task itself on 8 items at a penalty of 10: the pair's layer removes
    it, so that layer's 24-item target is never scored, and the challenge decides what it decides (here: a
    layer-0 set replaces the decoy's) when every layer surviving the first look is scored on the target."""
    from caploc.methods import groups

    lm, task = redundant
    decoy_set = [lm.layout.index(DECOY), lm.layout.index(type(DECOY)(DECOY.layer, 5))]

    def challenge():
        objective = Objective(Evaluator(lm, task, task.items(24, seed=0)), "logprob",
                              [Evaluator(lm, task, task.items(8, seed=1))], penalty=10.0)
        target, control = objective.responses(objective.set_masks([decoy_set]))
        asked, seen = objective.control_requested, len(objective._seen_control)
        kept = groups.challenge_layers(objective, decoy_set, float(target[0]), float(control[0]))
        # each control mask asked for once: those scored first are not asked for again
        assert objective.control_requested - asked == len(objective._seen_control) - seen
        return objective, kept

    skipping, (kept, _, _, record) = challenge()
    monkeypatch.setattr(groups, "_control_allows", lambda objective, masks, candidates, needed:
                        (np.ones(len(masks), dtype=bool), np.full(len(masks), np.nan)))
    scoring, (kept_all, _, _, record_all) = challenge()
    layer = REDUNDANT[0].layer
    assert np.isnan(record["layer_criterion"][layer])
    assert record_all["layer_criterion"][layer] < record["criterion_before"]  # scored in full: it loses
    assert kept == kept_all and record["set"] == record_all["set"]
    assert record["challengers"] == record_all["challengers"]
    assert skipping.requested < scoring.requested
    assert skipping.evaluator.stats.evaluations < scoring.evaluator.stats.evaluations


def test_a_control_that_costs_more_than_the_target_is_not_scored_first(redundant):
    lm, task = redundant
    from caploc.methods import groups

    objective = Objective(Evaluator(lm, task, task.items(8, seed=0)), "logprob",
                          [Evaluator(lm, task, task.items(24, seed=1))], penalty=10.0)
    masks = objective.set_masks(groups.layer_groups(objective))
    before = objective.control_requested
    allowed, damage = groups._control_allows(objective, masks, np.ones(len(masks), dtype=bool), 0.0)
    assert allowed.all() and np.isnan(damage).all()
    assert objective.control_requested == before
