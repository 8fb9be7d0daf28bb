"""Control-aware localization, attribution patching, screen-and-refine, bootstrap stability, and the tasks with
known heads (induction, IOI)."""

from pathlib import Path

import numpy as np
import torch
import pytest

from caploc import Criterion, EvalOptions, LocateOptions, TaskSpec, locate, report, wrap_model
from caploc.evaluator import EvalResult, Evaluator
from caploc.experiments.locate import selection_frequency
from caploc.masks import Masks
from caploc.methods import (AttributionPatching, CompressedSensing, Greedy, Objective, OneShotGreedy,
                            RestrictedGreedy, ScreenRefine, make_method)
from caploc.store import EvalStore
from caploc.tasks import get_task
from caploc.tasks.base import TargetTask
from tiny import PLANTED, build, byte_tokenizer, planted_model
from tiny import planted_objective as _objective

NO_STORE = EvalOptions(store=False)
NO_CONTROL = Criterion(control="none")


class PlantedResponses:
    """A stand-in evaluator with a known additive response: each ablated head lowers every item's score by its
    planted effect (plus fixed per-item noise). Lets a test say exactly which heads a criterion must pick."""

    def __init__(self, effects: np.ndarray, n_items: int = 40, base: float = -2.0, seed: int = 0, name="t"):
        self.effects = np.asarray(effects, dtype=float)
        self.n_components = len(effects)
        rng = np.random.default_rng(seed)
        self.item_base = base + 0.1 * rng.standard_normal(n_items)
        self.item_gain = 1 + 0.2 * rng.standard_normal(n_items)  # items feel the heads unequally
        self.task = type("T", (), {"identification_metric": "logprob", "name": name,
                                   "has_gradient": lambda self, metric: True})()

    def evaluate(self, masks):
        masks = Masks.of(masks, self.n_components)
        drop = masks.rows.astype(float) @ self.effects
        scores = self.item_base[None] - drop[:, None] * self.item_gain[None]
        return EvalResult(masks=masks, scores={"logprob": scores}, item_ids=[])

    def baseline(self):
        return self.evaluate(Masks.none(1, self.n_components))

    def gradients(self, metric, ablated=None):
        # score(multiplier s of head i) = base - effect_i * gain * (1 - s): d score / d s = effect_i * gain,
        # the same at every point (the response is additive)
        return self.item_gain[:, None] * self.effects[None, :]


N_HEADS = 24
UNSPECIFIC, SPECIFIC = 3, [7, 12]


def _planted_pair():
    """Head 3 carries the most target drop but also breaks the control; heads 7 and 12 carry the target only."""
    target = np.zeros(N_HEADS)
    target[UNSPECIFIC], target[SPECIFIC] = 1.2, [0.8, 0.6]
    control = np.zeros(N_HEADS)
    control[UNSPECIFIC] = 1.5
    control[20] = 0.4  # hurts the control only
    return PlantedResponses(target, name="target"), PlantedResponses(control, base=-3.0, seed=1, name="control")


@pytest.mark.parametrize("method", [OneShotGreedy(), Greedy(), AttributionPatching(),
                                    CompressedSensing("bernoulli", n_masks=120, sparsity=0.1, seed=0),
                                    ScreenRefine("atp", 6, exchange_passes=0),
                                    make_method("refine", screen="css", n_masks=120, sparsity=0.1)],
                         ids=["1s-greedy", "greedy", "atp", "csb", "refine-atp", "refine-css"])
def test_control_aware_methods_skip_a_head_that_also_breaks_the_control(method):
    target, control = _planted_pair()
    plain = method.run(Objective(target, "logprob"), k=2)
    aware = method.run(Objective(target, "logprob", [control], penalty=1.0), k=2)
    assert UNSPECIFIC in plain.top(2)  # the paper's objective takes the biggest drop
    assert set(aware.top(2)) == set(SPECIFIC)  # the control-aware criterion does not
    assert aware.control_effects is not None and aware.control_effects[UNSPECIFIC] > 0.1


@pytest.mark.parametrize("seed", range(4))
def test_greedy_evaluates_the_controls_only_where_they_can_change_its_choice(seed):
    """The criterion is at most the target's relative drop, so a round evaluates controls in that bound's
    order and stops once no remaining head can win: the same rounds as evaluating every control, for less."""
    rng = np.random.default_rng(seed)
    target = PlantedResponses(np.abs(rng.normal(0, 0.3, N_HEADS)), name="target")
    control = PlantedResponses(rng.normal(0, 0.4, N_HEADS), base=-3.0, seed=1, name="control")
    objective = Objective(target, "logprob", [control], penalty=1.0)
    result = Greedy().run(objective, k=4)
    reference = Objective(target, "logprob", [control], penalty=1.0)
    chosen = []
    for round_ in result.details["rounds"]:
        pool = [i for i in range(N_HEADS) if i not in chosen]
        criterion = reference.criterion(reference.set_masks([chosen + [i] for i in pool]))
        best = int(np.argmax(criterion))  # the first of equals, as a stable sort gives
        assert round_["head"] == pool[best] and round_["criterion"] == pytest.approx(criterion[best])
        chosen.append(pool[best])
    assert objective.requested == reference.requested
    assert objective.control_requested < reference.control_requested / 2
    assert np.isfinite(result.target_effects).all() and np.isnan(result.control_effects).any()


def test_improving_one_control_does_not_pay_for_damage_to_another():
    """Head 5 costs control A 30% of its score and improves control B by as much; head 9 does nothing to
    either. The control damage of head 5 is the mean of (30%, 0), not 0, exactly and in the gradient estimate,
    so a method choosing between the two target-equal heads takes head 9."""
    target, a, b = np.zeros(N_HEADS), np.zeros(N_HEADS), np.zeros(N_HEADS)
    target[[5, 9]] = 0.5
    a[5], b[5] = 0.9, -0.9  # base -3: a relative drop of 0.3 on A, an improvement of 0.3 on B
    objective = Objective(PlantedResponses(target, name="target"), "logprob",
                          [PlantedResponses(a, base=-3.0, seed=1, name="a"),
                           PlantedResponses(b, base=-3.0, seed=2, name="b")])
    _, damage = objective.responses(objective.set_masks([[5], [9]]))
    share = -np.expm1(-0.9 * objective.controls[0].item_gain.mean())  # of control A's answer probability
    np.testing.assert_allclose(damage, [share / 2, 0.0])
    _, estimated = objective.estimated_drops()
    np.testing.assert_allclose(estimated[[5, 9]], [share / 2, 0.0])
    assert OneShotGreedy().run(objective, k=1).top(1) == [9]


def test_penalty_zero_is_the_plain_ranking_and_the_criterion_is_documented():
    target, control = _planted_pair()
    objective = Objective(target, "logprob", [control], penalty=0.0, tolerance=np.inf)
    masks = objective.set_masks([[UNSPECIFIC], [SPECIFIC[0]], [20]])
    t, c = objective.responses(masks)

    def share(drop, baseline):  # the share of the target answer's probability removed (methods.base)
        return 1 - np.exp(-drop)

    np.testing.assert_allclose(objective.specificity(t, c), share(t, objective.baseline))
    assert np.all(np.argsort(objective.specificity(t, c)) == np.argsort(t))  # penalty 0: the plain ranking
    strict = Objective(target, "logprob", [control], penalty=2.0, tolerance=np.inf)
    spec = strict.specificity(t, c)
    np.testing.assert_allclose(spec, share(t, strict.baseline) - 2.0 * np.maximum(c, 0))
    assert c[2] > 0 and spec[2] < 0  # a head that only hurts the control scores below zero
    # saturation: however far a set breaks the target, it cannot buy control damage beyond its share's bound
    free = Objective(target, "logprob", [control], penalty=1.0)
    b = abs(free.baseline)
    assert free.specificity(np.array([50.0 * b, 2.0 * b]), np.array([0.5, 0.0])).argmax() == 1
    np.testing.assert_allclose(free.specificity(np.array([1e-6 * b]), np.array([0.0])), [1e-6 * b], rtol=1e-5)
    # whatever the baseline: a confident model's 2-nat drop removes 86% of its answer's probability
    confident = Objective(PlantedResponses(np.ones(N_HEADS), base=-0.02), "logprob", [control])
    np.testing.assert_allclose(confident.target_share(np.array([2.0])), [1 - np.exp(-2.0)])
    # the tolerance: past it, the control decides, whatever the target drop
    tolerant = Objective(target, "logprob", [control], penalty=1.0, tolerance=0.1)
    bounded = tolerant.specificity(t, c)
    within = c <= 0.1
    np.testing.assert_allclose(bounded[within], (share(t, tolerant.baseline) - np.maximum(c, 0))[within])
    assert c[0] > 0.1 and bounded[0] < bounded[1]  # the unspecific head now ranks below a specific one
    huge = tolerant.specificity(np.array([50.0, 0.5]), np.array([0.2, 0.0]))
    assert huge[0] < huge[1]  # no target drop buys control damage beyond the tolerance


def test_atp_equals_the_finite_difference_derivative(planted):
    _, task = planted
    lm = wrap_model(planted_model().double(), byte_tokenizer(), spec="planted-fp64")  # FD needs the precision
    items = task.items(6, seed=0)
    evaluator = Evaluator(lm, task, items)
    gradient = evaluator.gradients("logprob")  # [items, heads]
    heads = [lm.layout.index(h) for h in PLANTED] + [0, 17]
    eps = 1e-3
    up = Evaluator(lm, task, items, scale=1 + eps, store=None).evaluate([[h] for h in heads]).scores["logprob"]
    down = Evaluator(lm, task, items, scale=1 - eps, store=None).evaluate([[h] for h in heads]).scores["logprob"]
    finite = (up - down) / (2 * eps)  # [heads, items]
    # RMSNorm and rotary run in fp32 even in an fp64 model: agreement to 1e-4, far below the values (~0.01-2)
    np.testing.assert_allclose(gradient[:, heads].T, finite, rtol=1e-3, atol=1e-4)
    assert np.abs(gradient[:, heads[:3]]).max() > 0.01  # the planted heads really have gradients
    assert np.abs(gradient[:, 0]).max() == 0  # a zeroed head has none


def test_atp_gradients_for_multiple_choice_logit_difference():
    lm = wrap_model(build("llama"), byte_tokenizer(), spec="tiny")
    task = get_task("ioi")
    items = task.items(4)
    evaluator = Evaluator(lm, task, items)
    diff = evaluator.gradients("logit_diff")
    lp = evaluator.gradients("logprob")
    assert diff.shape == lp.shape == (4, lm.layout.n_total)
    with pytest.raises(Exception, match="no gradient"):
        evaluator.gradients("acc")


def test_refine_over_every_head_is_plain_iterative_greedy(planted):
    lm, _ = planted
    greedy = Greedy().run(_objective(planted), k=3)
    refine = ScreenRefine("atp", n_candidates=lm.layout.n_total, exchange_passes=0).run(_objective(planted), k=3)
    assert refine.top(3) == greedy.top(3)
    assert [r["head"] for r in refine.details["rounds"]] == [r["head"] for r in greedy.details["rounds"]]
    assert {lm.layout.head(i) for i in refine.top(3)} == set(PLANTED)


def test_atp_misses_a_saturated_head_that_refine_with_a_cs_screen_finds(planted):
    # the planted heads are scaled up and the targets are the intact model's own preferences: at multiplier 1
    # the answer's softmax is saturated, so the gradient of L1H3 is ~0 although removing it costs 1.4 nats
    lm, _ = planted
    objective = _objective(planted)
    estimated, _ = objective.estimated_drops()
    exact = objective.drops(objective.set_masks([[lm.layout.index(h)] for h in PLANTED]))
    l1h3 = lm.layout.index(PLANTED[0])
    assert exact[0] > 1.0 and abs(estimated[l1h3]) < 0.05
    atp_top = AttributionPatching().run(objective, 3).top(6)
    assert l1h3 not in atp_top
    objective = _objective(planted)
    result = ScreenRefine("css", n_candidates=6, exchange_passes=0, n_masks=40, sparsity=0.1, seed=0).run(objective,
                                                                                                         k=3)
    assert {lm.layout.head(i) for i in result.top(3)} == set(PLANTED)
    # the screen's masks, greedy over its 6 candidates, then the layer challenge's one mask per layer that its
    # first look keeps
    kept = lm.layout.n_layers - len(result.details["layer_challenge"]["first_look"]["ruled_out"])
    assert objective.requested == 40 + 6 + 5 + 4 + kept
    assert len(result.details["candidates"]) == 6


def test_bootstrap_frequencies_are_deterministic_given_the_seed(planted):
    objective = _objective(planted)
    method = ScreenRefine("css", n_candidates=8, exchange_passes=0, n_masks=40, sparsity=0.1, seed=0)
    method.run(objective, k=3)
    requested = objective.requested
    a = selection_frequency(method, objective, 3, 40, seed=0)
    b = selection_frequency(method, objective, 3, 40, seed=0)
    np.testing.assert_array_equal(a, b)
    assert objective.requested == requested  # replays from the stored per-item scores: no new evaluation
    lm = planted[0]
    assert all(a[lm.layout.index(h)] >= 0.9 for h in PLANTED)
    assert abs(a.sum() - 3) < 1e-9
    noisy = _planted_pair()[0]
    cs = CompressedSensing("bernoulli", n_masks=40, sparsity=0.1, seed=0)
    noisy_objective = Objective(noisy, "logprob")
    cs.run(noisy_objective, 2)
    c1 = selection_frequency(cs, noisy_objective, 2, 30, seed=1)
    assert np.array_equal(c1, selection_frequency(cs, noisy_objective, 2, 30, seed=1))


def test_locate_with_control_seeds_and_stability(planted, tmp_path):
    lm, task = planted
    store = EvalOptions(store=EvalStore(tmp_path / "s.sqlite"))
    # in this random tiny model the planted heads are the only live ones, so they carry the control too:
    # penalty 0 keeps the target's ranking while the control is still measured and reported
    run = locate(lm, TaskSpec(task, n=12, n_validate=6), make_method("refine", screen="css", n_masks=30,
                                                                      sparsity=0.1), k=3,
                 criterion=Criterion(control="general", n_control=4, penalty=0.0),
                 options=LocateOptions(bootstrap=10, seeds=(0, 1)), evaluation=store, out=tmp_path / "run")
    assert {h["head"] for h in run.heads} == {str(h) for h in PLANTED}
    assert all(h["selection_frequency"] >= 0.5 and h["seed_frequency"] == 1.0 for h in run.heads)
    assert run.stability["mean_pairwise_overlap"] == 3 and len(run.stability["top_k_per_seed"]) == 2
    assert run.control["tasks"][0]["task"] == "general" and "general" in run.control_validation
    assert len(run.head_effects["target"]) == len(run.head_effects["control"]) == lm.layout.n_total
    written = report(tmp_path / "run")
    assert "effects" in written.figures
    plain = locate(lm, TaskSpec(task, n=12), "1s-greedy", k=3, criterion=NO_CONTROL,
                   options=LocateOptions(bootstrap=0), evaluation=store)
    assert plain.control["tasks"] == [] and plain.head_effects["control"] is None and plain.stability == {}


class StopsShortOnSeedOne(OneShotGreedy):
    """One-shot greedy, except that on seed 1 its search ends at the heads that matter least (a search failure,
    planted): the planted heads rank last."""

    name = "stops-short"

    def __init__(self, seed: int = 0):
        super().__init__()
        self.seed = seed

    def run(self, objective, k):
        result = super().run(objective, k)
        if self.seed == 1:
            result.ranking = result.ranking[::-1]
        return result


def test_locate_with_seeds_names_the_seed_whose_search_stopped_short(planted, tmp_path):
    """Each seed's set is scored under every seed's criterion: seed 1's own items prefer seed 0's set (the
    planted heads) in every resample, so seed 1's search is flagged, and seed 0's set is the best on all items."""
    lm, task = planted
    store = EvalOptions(store=EvalStore(tmp_path / "s.sqlite"))
    run = locate(lm, TaskSpec(task, n=12, n_validate=6), StopsShortOnSeedOne(), k=3, criterion=NO_CONTROL,
                 options=LocateOptions(bootstrap=0, seeds=(0, 1)), evaluation=store, out=tmp_path / "run")
    cross = run.stability["cross_seed"]
    sets = [[lm.layout.index(h) for h in lm.layout.parse_list(",".join(top))]
            for top in run.stability["top_k_per_seed"]]
    assert {lm.layout.head(i) for i in sets[0]} == set(PLANTED) and not set(sets[0]) & set(sets[1])
    for seed, row in enumerate(cross["criterion"]):  # the criterion of each set, on each seed's own items
        objective = Objective(Evaluator(lm, task, task.items(12, seed)), "logprob")
        np.testing.assert_allclose(row, objective.criterion(objective.set_masks(sets)), rtol=1e-6)
    assert cross["criterion"][1][0] > cross["criterion"][1][1] and cross["beats_own"][1][0] >= 0.95
    assert cross["beats_own"][0][1] < 0.05 and cross["best_seed"] == 0
    assert [(m["seed"], m["better_seed"]) for m in cross["search_stopped_short"]] == [(1, 0)]
    assert any("seed 1: the set of seed 0 scores" in w and "stopped short" in w for w in run.warnings)
    assert "seed 1&#x27;s search stopped short" in Path(report(tmp_path / "run").html).read_text()


def test_the_budget_counts_the_tokens_the_gradient_screen_runs(planted, tmp_path):
    """The budget counts what gradients run: three passes (forward + backward) per token per gradient point; a
    few-shot prefix shared by the items once, every other row with its whole prompt, and only the sequences
    the metric uses (a multiple-choice `logprob`: the correct choice). They are stored: a rerun computes
    none, and its logical budget is the same."""
    from caploc.evaluator.requests import MIN_SHARED_PREFIX

    lm, task = planted
    args = (lm, TaskSpec(task, n=6, n_validate=3), "refine")
    kwargs = dict(k=2, criterion=Criterion(control="general", n_control=3), options=LocateOptions(bootstrap=0),
                  evaluation=EvalOptions(store=str(tmp_path / "s.sqlite")))
    run = locate(*args, **kwargs)
    tokens = 0
    for t, n in ((task, 6), (get_task("general"), 3)):
        evaluator = Evaluator(lm, t, t.items(n, 0))
        weights = evaluator._metric_weights(t.identification_metric)
        for prefix, members in evaluator.requests.prefix_groups().items():
            used = [evaluator.requests.sequences[s] for s in members if weights[s]]
            shared = len(prefix) >= MIN_SHARED_PREFIX and len({s.item for s in used}) > 1
            tokens += (len(prefix) if shared else len(prefix) * len(used)) + sum(
                len(s.context) + len(s.continuation) for s in used)
    # one gradient per greedy round and one per exchange pass (at the chosen set)
    points = run.details["gradient_points"]
    assert points == len(run.details["rounds"]) + len(run.details["exchanges"]) >= 3
    assert run.budget["gradient_model_tokens"] == 3 * points * tokens
    per_mask = [Evaluator(lm, t, t.items(n, 0)).tokens_per_mask() for t, n in ((task, 6), (get_task("general"), 3))]
    budget = run.budget
    assert budget["logical_model_tokens"] == (budget["evaluations"] * per_mask[0] + budget["gradient_model_tokens"]
                                              + budget["control_evaluations"] * per_mask[1])
    assert 0 < budget["control_evaluations"] < budget["evaluations"]  # greedy rounds bound the controls
    rerun = locate(*args, **kwargs)
    assert rerun.budget["gradient_model_tokens"] == rerun.budget["computed_evaluations"] == 0
    assert rerun.budget["logical_model_tokens"] == budget["logical_model_tokens"]
    assert rerun.ranking == run.ranking


def test_induction_and_ioi_items_are_seeded_and_well_formed():
    induction = get_task("induction")
    items = induction.items(20, seed=3)
    assert [i.id for i in items] == [i.id for i in induction.items(20, seed=3)]
    for item in items:
        first, repeat = item.context.split(". ")
        words = first.split()
        assert repeat.split() == words[:len(repeat.split())] and item.target == " " + words[len(repeat.split())]
    ioi = get_task("ioi")
    items = ioi.items(30, seed=0)
    assert {i.label for i in items} == {0, 1}
    for item in items:
        io, subject = item.meta["indirect_object"], item.meta["subject"]
        assert item.choices[item.label] == " " + io and subject in item.context and item.context.count(subject) == 2
        assert item.context.count(io) == 1
    assert isinstance(induction, TargetTask) and ioi.identification_metric == "logit_diff"


def test_prefix_matching_scores_find_a_planted_induction_pattern():
    from caploc.tasks import Induction

    lm = wrap_model(build("llama"), byte_tokenizer(), spec="tiny")
    before = lm.model.config._attn_implementation
    scores = Induction.head_scores(lm, n=2, length=12)["prefix_matching"]
    assert scores.shape == (lm.layout.n_layers, lm.layout.n_heads)
    assert ((scores >= 0) & (scores <= 1)).all()
    assert not any(m._forward_pre_hooks for m in lm.model.modules())
    assert lm.model.config._attn_implementation == before  # eager only while the weights are read


def test_locate_checks_its_heads_against_the_attention_signature_of_induction_and_ioi_heads(smollm):
    from caploc import api
    from caploc.cli import render

    quick = dict(criterion=NO_CONTROL, options=LocateOptions(bootstrap=0), evaluation=NO_STORE)
    run = locate(smollm, TaskSpec("induction", n=6, n_validate=4), "atp", k=5, **quick)
    check = run.attention_check
    assert check["score"] == "prefix_matching" and len(check["top"]) == 10
    # SmolLM2's induction heads (bench/locate_quality.py, bf16): the fp32 model has the same ones on top
    assert {"L17H3", "L17H4", "L18H6", "L18H7", "L23H2"} <= set(check["top"])
    assert check["top_scores"] == sorted(check["top_scores"], reverse=True) and check["top_scores"][-1] > 0.25
    assert set(check["reported_scores"]) == set(run.top_heads(5))
    assert check["reported_in_top"] == [h for h in run.top_heads(5) if h in check["top"]]
    with render.console.capture() as captured:
        render.print_locate(run)
    assert (f"attention check (prefix matching, Olsson et al. 2022, repeated random tokens): "
            f"{len(check['reported_in_top'])} of the top-5 among the 10 highest heads") in captured.get()
    ioi = locate(smollm, TaskSpec("ioi", n=4, n_validate=2), "atp", k=2, **quick)
    # the name mover by attention: from the last token, L24H4 looks at the indirect object, not the subject
    assert ioi.attention_check["score"] == "name_mover" and ioi.attention_check["top"][0] == "L24H4"
    heads = {h["head"]: h for h in api.heads(smollm, scores="ioi").heads}
    assert heads["L24H4"]["name_mover"] > 0.4 > heads["L24H4"]["subject"]
    assert locate(smollm, TaskSpec("arithmetic", subtask="2D+", n=4, n_validate=2), "atp", k=2,
                  **quick).attention_check == {}


def test_attention_signatures_tell_previous_token_and_induction_heads_apart():
    """Constructed attention patterns on a BOS and a 6-token sequence repeated: a head that always attends to
    the token before, one that attends to the token after the query's first occurrence, one to itself."""
    from caploc.tasks.induction import attention_signatures

    length, offset = 6, 1
    total = offset + 2 * length
    previous, induction, itself = (torch.zeros(total, total) for _ in range(3))
    for q in range(total):
        previous[q, max(q - 1, 0)] = 1
        itself[q, q] = 1
        induction[q, q - length + 1 if q > offset + length else q] = 1
    scores = attention_signatures([torch.stack([previous, induction, itself])[None]], length, offset)
    np.testing.assert_allclose(scores["previous_token"], [[1, 0, 0]])
    np.testing.assert_allclose(scores["prefix_matching"], [[0, 1, 0]])


class BackupResponses(PlantedResponses):
    """Head B is a backup of head A: it matters only once A is gone (score - e_B (1 - s_A)(1 - s_B)), so at the
    unablated model its gradient is zero."""

    def __init__(self, effects, a: int, b: int, backup: float, **kw):
        super().__init__(effects, **kw)
        self.a, self.b, self.backup = a, b, backup

    def evaluate(self, masks):
        result = super().evaluate(masks)
        masks = result.masks.rows
        both = (masks[:, self.a] & masks[:, self.b]).astype(float)
        result.scores["logprob"] = result.scores["logprob"] - self.backup * both[:, None] * self.item_gain[None]
        return result

    def gradients(self, metric, ablated=None):
        s = np.ones(self.n_components)
        if ablated is not None:
            s[list(ablated)] = 0.0
        grad = np.tile(self.effects, (len(self.item_gain), 1)) * self.item_gain[:, None]
        grad[:, self.a] += self.backup * (1 - s[self.b]) * self.item_gain
        grad[:, self.b] += self.backup * (1 - s[self.a]) * self.item_gain
        return grad


def test_adaptive_refine_finds_a_backup_head_the_first_gradient_cannot_see():
    effects = np.zeros(N_HEADS)
    effects[2], effects[[5, 9, 14]] = 1.0, [0.30, 0.25, 0.2]
    responses = BackupResponses(effects, a=2, b=17, backup=0.9)
    objective = Objective(responses, "logprob")
    assert objective.estimated_drops()[0][17] == 0  # invisible to AtP at the unablated model
    adaptive = ScreenRefine("atp", n_candidates=3, exchange_passes=0).run(objective, 2)
    assert adaptive.top(2) == [2, 17]
    assert adaptive.details["gradient_points"] == 2
    static = RestrictedGreedy(AttributionPatching().run(Objective(responses, "logprob"), 2).ranking[:3]).run(
        Objective(responses, "logprob"), 2)
    assert static.top(2) == [2, 5]  # restricted to the first screen's candidates, greedy cannot reach 17


class MisreadControl(PlantedResponses):
    """A control that ablating `head` does not hurt, but whose gradient at the model says it does (a curved
    response: the first-order estimate of a control's damage is not what ablation costs)."""

    def __init__(self, head: int, slope: float):
        super().__init__(np.zeros(N_HEADS), base=-3.0, seed=1, name="control")
        self.head, self.slope = head, slope

    def gradients(self, metric, ablated=None):
        grad = super().gradients(metric, ablated)
        grad[:, self.head] = self.slope * self.item_gain
        return grad


def test_refine_can_nominate_the_largest_target_effects_whatever_the_control_estimate():
    effects = np.zeros(N_HEADS)
    effects[5], effects[[8, 11, 15, 19]] = 1.0, [0.5, 0.45, 0.4, 0.35]
    target, control = PlantedResponses(effects, name="target"), MisreadControl(head=5, slope=1.5)

    def objective():
        return Objective(target, "logprob", [control], penalty=1.0)

    assert objective().estimated_drops()[1][5] > 0.3  # the screen's criterion estimate keeps head 5 out
    assert objective().responses(objective().set_masks([[5]]))[1][0] == 0  # ablating it costs the control nothing
    nominated = ScreenRefine("atp", n_candidates=4, target_candidates=1, exchange_passes=0).run(objective(), 2)
    assert nominated.details["target_candidates"] == 1 and 5 in nominated.details["candidates"]
    assert nominated.top(2) == [5, 8]  # decided exactly: the largest drop, at no control cost
    by_criterion = ScreenRefine("atp", n_candidates=4, exchange_passes=0).run(objective(), 2)  # the default
    assert by_criterion.details["target_candidates"] == 0
    assert 5 not in by_criterion.details["candidates"] and by_criterion.top(2) == [8, 11]


def test_default_refine_screens_generation_tasks_by_regression(tmp_path):
    lm = wrap_model(build("llama"), byte_tokenizer(), spec="tiny-llama")
    data = str(Path(__file__).parent / "fixtures" / "gsm8k_mini.jsonl")
    run = locate(lm, TaskSpec("gsm8k", data=data, shots=1, n=2, n_validate=2), make_method(
        "refine", n_masks=8, n_candidates=2), k=1, criterion=Criterion(metric="acc", control="none"),
        options=LocateOptions(bootstrap=0), evaluation=EvalOptions(max_new_tokens=3, store=False))
    assert run.details["screen"]["name"] == "csb"
    assert any("no gradient" in w for w in run.warnings)


def test_batch_size_follows_free_device_memory(smollm):
    import torch

    from caploc.evaluator.runner import CPU_BATCH_TOKENS, MAX_BATCH_TOKENS, default_batch_tokens, tokens_for_memory

    assert default_batch_tokens(smollm) == CPU_BATCH_TOKENS  # CPUs: a fixed, cache-friendly size
    config = smollm.model.config
    sizes = [tokens_for_memory(gb << 30, config, torch.bfloat16) for gb in (1, 8, 40)]
    assert sizes[0] < sizes[1] < sizes[2] <= MAX_BATCH_TOKENS
    assert tokens_for_memory(1 << 20, config, torch.bfloat16) == 1024  # never below one small batch
    # fp32 activations are twice as wide as bf16 ones: fewer tokens fit
    assert tokens_for_memory(8 << 30, config, torch.float32) < sizes[1]


def test_gradients_on_top_of_an_ablation_equal_those_of_the_weight_zeroed_model(planted):
    from caploc.sites import head_site

    _, task = planted
    lm = wrap_model(planted_model(), byte_tokenizer(), spec="planted")
    items = task.items(6, seed=0)
    first = lm.layout.index(PLANTED[0])
    at_ablation = Evaluator(lm, task, items).gradients("logprob", ablated=[first])
    zeroed = planted_model()
    head_site(zeroed).zero_columns([PLANTED[0]])
    reference = Evaluator(wrap_model(zeroed, byte_tokenizer(), spec="planted-zeroed"), task, items).gradients("logprob")
    others = [i for i in range(lm.layout.n_total) if i != first]
    np.testing.assert_allclose(at_ablation[:, others], reference[:, others], rtol=1e-4, atol=1e-6)
    assert not np.allclose(at_ablation, Evaluator(lm, task, items).gradients("logprob"))  # the point matters


def test_bootstrap_replays_of_refine_that_leave_the_evaluated_path_still_rank():
    """A resample whose screen nominates only heads the run never tried must not fail: it keeps the screen's
    order (found by `locate --candidates 4 --k 2` on the real model, where 4 items make AtP's ranking noisy)."""
    target, control = _planted_pair()
    objective = Objective(target, "logprob", [control])
    AttributionPatching().run(objective, 2)  # the run's gradient, which replays reuse
    RestrictedGreedy([0, 1]).run(objective, 2)
    replay = objective.resampled(np.random.default_rng(0))
    untried = RestrictedGreedy([5, 6]).run(replay, 2)
    assert untried.details["rounds"] == [] and untried.top(2) == [5, 6]

    class Fixed(AttributionPatching):  # a screen whose nominees the run never evaluated
        def run(self, objective, k):
            result = super().run(objective, k)
            result.ranking = [5, 6] + [i for i in result.ranking if i not in (5, 6)]
            return result

    class FixedRefine(ScreenRefine):
        def _screen(self, name):
            return Fixed()

    refined = FixedRefine("atp", n_candidates=2, exchange_passes=0).run(replay, 2)
    assert refined.top(2) == [5, 6] and refined.details["gradient_points"] == 0


def test_printed_table_shows_what_each_refine_pick_added(planted):
    from caploc.cli import render

    lm, task = planted
    run = locate(lm, TaskSpec(task, n=8, n_validate=4), make_method("refine", n_candidates=4), k=3,
                 criterion=NO_CONTROL, options=LocateOptions(bootstrap=0), evaluation=NO_STORE)
    with render.console.capture() as captured:
        render.print_locate(run)
    text = captured.get()
    assert "added drop" in text and "nan" not in text
    added = [r["cumulative_drop"] for r in run.details["rounds"]]
    assert f"{added[0]:.4f}" in text and f"{added[1] - added[0]:.4f}" in text
    n_heads = lm.layout.n_heads
    run.details["exchanges"] = [{"tried": 8, "criterion_before": 0.5, "proposed": [1, n_heads + 2], "support": 0.93,
                                 "swap": [1, n_heads + 2], "criterion": 0.75}]
    with render.console.capture() as captured:
        render.print_locate(run)
    assert "exchange: L0H1 -> L1H2, criterion 0.5000 -> 0.7500, higher in 93% of item resamples: kept" in captured.get()
    run.details["layer_challenge"] = {"criterion_before": 0.75, "proposed": [n_heads, n_heads + 2],
                                      "proposed_criterion": 0.8, "support": 0.6, "set": None}
    with render.console.capture() as captured:
        render.print_locate(run)
    assert ("layer challenge: L1H0, L1H2 (a layer's heads eliminated down to k), criterion 0.7500 -> 0.8000, "
            "higher in 60% of item resamples: not kept") in captured.get()
    run.details["layer_challenge"] |= {"polish": [{"swap": [n_heads + 1, n_heads + 2]}], "support": 0.97,
                                       "set": [n_heads, n_heads + 2]}
    with render.console.capture() as captured:
        render.print_locate(run)
    assert ("layer challenge: L1H0, L1H2 (a layer's heads eliminated down to k, then L1H1 -> L1H2), criterion "
            "0.7500 -> 0.8000, higher in 97% of item resamples: kept") in captured.get()


class SynergyResponses(PlantedResponses):
    """Heads B and C pay off together: ablating both lowers item j's score by a further synergy[j] (score -
    synergy (1 - s_B)(1 - s_C)), so greedy, which adds one head at a time, takes the larger single head A
    first and never revisits it."""

    def __init__(self, effects, b: int, c: int, synergy, **kw):
        super().__init__(effects, **kw)
        self.b, self.c, self.synergy = b, c, np.asarray(synergy, dtype=float)

    def evaluate(self, masks):
        result = super().evaluate(masks)
        masks = result.masks.rows
        both = (masks[:, self.b] & masks[:, self.c]).astype(float)
        result.scores["logprob"] = result.scores["logprob"] - both[:, None] * self.synergy[None]
        return result

    def gradients(self, metric, ablated=None):
        s = np.ones(self.n_components)
        if ablated is not None:
            s[list(ablated)] = 0.0
        grad = super().gradients(metric)
        grad[:, self.b] += self.synergy * (1 - s[self.c])
        grad[:, self.c] += self.synergy * (1 - s[self.b])
        return grad


def _synergy(synergy):
    effects = np.zeros(N_HEADS)
    effects[[4, 9, 15]] = [1.0, 0.6, 0.59]  # A = 4 is the best single head; B = 9 and C = 15 only together
    return SynergyResponses(effects, b=9, c=15, synergy=synergy)


def test_exchange_swaps_greedys_first_pick_for_the_pair_that_pays_off_together():
    responses = _synergy(np.ones(40))
    greedy = Greedy().run(Objective(responses, "logprob"), 2)
    assert greedy.top(2) == [4, 9]  # 1.6 nats; {9, 15} would remove 2.19
    objective = Objective(responses, "logprob")
    result = ScreenRefine("atp", n_candidates=4, exchange_passes=2).run(objective, 2)
    assert set(result.top(2)) == {9, 15}
    first, second = result.details["exchanges"]
    assert first["swap"] == [4, 15] and first["support"] >= 0.95
    assert first["criterion"] == pytest.approx(objective.drops(objective.set_masks([[9, 15]]))[0])
    assert second["swap"] is None  # nothing improves {9, 15}: the passes stop
    without = ScreenRefine("atp", n_candidates=4, exchange_passes=0).run(Objective(responses, "logprob"), 2)
    assert without.top(2) == [4, 9] and without.details["exchanges"] == []


def test_exchange_keeps_a_swap_only_if_item_resamples_agree():
    """The same pair, but its synergy sits on one of the 40 items: the swap raises the mean, yet a resample
    that leaves that item out says otherwise, so the set is item noise and stays as greedy chose it."""
    synergy = np.zeros(40)
    synergy[0] = 40.0  # the same mean synergy as above, carried by item 0
    objective = Objective(_synergy(synergy), "logprob")
    result = ScreenRefine("atp", n_candidates=4, exchange_passes=2).run(objective, 2)
    assert result.top(2) == [4, 9]
    (record,) = result.details["exchanges"]
    assert record["proposed"] == [4, 15] and record["swap"] is None
    assert 0.4 < record["support"] < 0.9  # item 0 is absent from about a third of the resamples


def test_bootstrap_replays_of_refine_with_exchange_are_deterministic_and_make_no_new_evaluation():
    objective = Objective(_synergy(np.ones(40)), "logprob")
    method = ScreenRefine("atp", n_candidates=4, exchange_passes=2)
    result = method.run(objective, 2)
    asked = objective.requested
    frequency = [selection_frequency(method, objective, 2, 20, seed=3, details=result.details) for _ in range(2)]
    np.testing.assert_array_equal(frequency[0], frequency[1])
    assert objective.requested == asked
    assert frequency[0][9] == frequency[0][15] == 1.0
