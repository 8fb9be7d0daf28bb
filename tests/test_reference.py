"""Generation tasks identified by their reference's log-probability (`ref_logprob`, mean per token): one
teacher-forced pass per mask instead of generating under every mask, exact against a plain forward, with
gradients; every result still reports the real metric by generation."""

from pathlib import Path

import numpy as np
import pytest
import torch

from caploc import Criterion, EvalOptions, LocateOptions, TaskSpec, locate, wrap_model
from caploc.evaluator import Evaluator
from caploc.errors import CaplocError
from caploc.tasks import GSM8K as GSM8KTask
from caploc.tasks import OWN_METRIC, REFERENCE_METRIC, OwnReferenceTask, get_task
from caploc.tasks.base import ReferenceTask
from tiny import ARCHS, build, byte_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
GSM8K = str(FIXTURES / "gsm8k_mini.jsonl")
MBPP = str(FIXTURES / "mbpp_mini.jsonl")


def _plain_reference_logprob(lm, item, reference):
    """log p(reference | prompt) per reference token, from one plain forward over prompt + reference."""
    tok = lm.tokenizer
    prompt = tok(item.prefix + item.context)["input_ids"]
    full = tok(item.prefix + item.context + reference)["input_ids"]
    assert full[:len(prompt)] == prompt  # the byte tokenizer never merges across the boundary
    with torch.no_grad():
        logits = lm.model(torch.tensor([full], device=lm.model.device)).logits[0].double().cpu()
    targets = torch.tensor(full[len(prompt):])
    lp = torch.log_softmax(logits[len(prompt) - 1:-1], -1).gather(-1, targets[:, None]).squeeze(-1)
    return float(lp.mean())


CASES = [(name, "gsm8k", {"data": GSM8K, "shots": 0}) for name in ARCHS] + [
    (name, "mbpp", {"data": MBPP, "shots": 0, "allow_code_execution": True}) for name in ARCHS] + [
    ("llama", "gsm8k", {"data": GSM8K, "shots": 2})]  # a few-shot prefix (beyond GPT-2's 512 tiny positions)


@pytest.mark.parametrize("name,task_name,options", CASES)
def test_the_reference_metric_is_a_plain_forwards_log_probability_per_token(name, task_name, options):
    lm = wrap_model(build(name), byte_tokenizer(), spec=name)
    task = get_task(task_name, **options)
    assert task.identification_metric == REFERENCE_METRIC and task.has_gradient(REFERENCE_METRIC) is False
    view = task.for_metric(REFERENCE_METRIC)
    assert isinstance(view, ReferenceTask) and view.has_gradient(REFERENCE_METRIC)
    # items that fit the tiny GPT-2's 512 learned positions (bytes are tokens here)
    items = [i for i in view.items(8, seed=1) if len(i.prefix + i.context + i.target) < 500 or name != "gpt2"][:3]
    scores = Evaluator(lm, view, items).evaluate([[], [1, lm.layout.n_heads]]).scores
    expected = [_plain_reference_logprob(lm, item, item.target) for item in items]
    np.testing.assert_allclose(scores[REFERENCE_METRIC][0], expected, atol=2e-5)
    assert not np.allclose(scores[REFERENCE_METRIC][1], expected)  # the ablation is seen
    # the source task's items and the view's are the same items, the view's target their reference
    source_items = {i.id: i for i in task.items(8, seed=1)}
    assert [i.id for i in view.items(8, seed=1)] == list(source_items)
    assert all(v.target == task.reference(source_items[v.id]) and v.target for v in items)


def test_references_are_the_solution_through_the_answer_the_code_and_the_canonical_solution():
    gsm8k = get_task("gsm8k", data=GSM8K, shots=1)
    item = gsm8k.items(1)[0]
    assert gsm8k.reference(item).startswith(" ") and gsm8k.reference(item).rstrip().endswith(f"#### {item.answer}")
    mbpp = get_task("mbpp", data=MBPP, shots=1, allow_code_execution=True)
    assert "def " in mbpp.reference(mbpp.items(1)[0])  # the reference code, as the exemplars show theirs
    humaneval = get_task("humaneval", allow_code_execution=True)
    items = humaneval.items(164)
    assert all(humaneval.reference(i) for i in items)  # every problem has its canonical solution
    assert get_task("rhyme").scorings() == [get_task("rhyme")] or not get_task("rhyme").has_references
    # the view is stored apart from the generations: its config is marked
    assert gsm8k.for_metric(REFERENCE_METRIC).config() == gsm8k.config() | {"scored": "reference"}


def test_atp_on_the_reference_metric_equals_the_finite_difference():
    lm = wrap_model(build("llama").double(), byte_tokenizer(), spec="llama-fp64")
    view = get_task("gsm8k", data=GSM8K, shots=1).for_metric(REFERENCE_METRIC)
    items = view.items(3, seed=0)
    gradient = Evaluator(lm, view, items).gradients(REFERENCE_METRIC)  # [items, heads]
    heads, eps = [0, 5, lm.layout.n_total - 1], 1e-3
    up = Evaluator(lm, view, items, scale=1 + eps).evaluate([[h] for h in heads]).scores[REFERENCE_METRIC]
    down = Evaluator(lm, view, items, scale=1 - eps).evaluate([[h] for h in heads]).scores[REFERENCE_METRIC]
    finite = (up - down) / (2 * eps)  # [heads, items]
    # the items share the few-shot prefix, whose gradient one backward pass cannot split between them: the
    # item mean (what the screen ranks by) is exact, each item's only up to its share of the prefix's
    np.testing.assert_allclose(gradient[:, heads].mean(0), finite.mean(1), rtol=1e-3, atol=1e-5)
    assert np.abs(gradient[:, heads]).max() > 1e-3
    alone = get_task("gsm8k", data=GSM8K, shots=0).for_metric(REFERENCE_METRIC)  # no shared prefix: per item
    items = alone.items(3, seed=0)
    per_item = Evaluator(lm, alone, items).gradients(REFERENCE_METRIC)[:, heads].T
    up = Evaluator(lm, alone, items, scale=1 + eps).evaluate([[h] for h in heads]).scores[REFERENCE_METRIC]
    down = Evaluator(lm, alone, items, scale=1 - eps).evaluate([[h] for h in heads]).scores[REFERENCE_METRIC]
    np.testing.assert_allclose(per_item, (up - down) / (2 * eps), rtol=1e-3, atol=1e-5)


def test_locate_identifies_a_generation_task_on_its_reference_and_validates_by_generation():
    lm = wrap_model(build("llama"), byte_tokenizer(), spec="tiny-llama")
    run = locate(lm, TaskSpec("gsm8k", data=GSM8K, shots=1, n=3, n_validate=2), k=2,
                 criterion=Criterion(control="none"), options=LocateOptions(bootstrap=0),
                 evaluation=EvalOptions(max_new_tokens=4, store=False))
    assert run.metric == REFERENCE_METRIC and run.details["screen"]["name"] == "atp"  # gradients: no fallback
    assert not any("no gradient" in w for w in run.warnings)
    # held out: the reference's log-probability for every j, the real metric (generation) with all k ablated
    assert [p["k"] for p in run.validation[REFERENCE_METRIC]] == [1, 2]
    assert [p["k"] for p in run.validation["acc"]] == [2]


def test_neurons_attribute_a_generation_task_on_its_reference(tmp_path, monkeypatch):
    from caploc import CNLOptions, neurons

    monkeypatch.setenv("CAPLOC_CACHE", str(tmp_path))
    lm = wrap_model(build("llama"), byte_tokenizer(), spec="tiny-llama")
    report = neurons(lm, TaskSpec("gsm8k", data=GSM8K, shots=0, n=3), CNLOptions(top_q=0.05, min_share=0.3,
                                                                                 enhance=(1.5,), general=None),
                     evaluation=EvalOptions(store=False))
    assert report.ablation["task"]["metric"] == REFERENCE_METRIC and report.neurons


def test_eval_scores_a_generation_task_and_its_references_on_the_same_items():
    # `caploc eval` and `specificity` hand the generation task's items to every scoring: the reference view
    # must get them with their references as targets, not as they are (once "has an empty target/choice")
    from caploc import evaluate

    lm = wrap_model(build("llama"), byte_tokenizer(), spec="llama")
    task = get_task("gsm8k", data=GSM8K, shots=0)
    result = evaluate(lm, TaskSpec(task, n=3, seed=1), ablate="L1H0", evaluation=EvalOptions(max_new_tokens=4))
    assert {"acc", REFERENCE_METRIC, "logprob"} <= set(result.metrics)
    view = task.for_metric(REFERENCE_METRIC)
    expected = [_plain_reference_logprob(lm, item, item.target) for item in view.items(3, seed=1)]
    assert result.metrics[REFERENCE_METRIC]["baseline"] == pytest.approx(np.mean(expected), abs=2e-5)


class _SolvesSome(GSM8KTask):
    """GSM8K scored as if the model did the questions before "M" (a tiny random model does none)."""

    def score(self, item, generated):
        return float(item.id < "M")


def test_own_reference_items_are_the_models_own_completions_of_the_items_it_does():
    # own_logprob: one generation, the items that score above 0 keep their completion as the target, and the
    # metric is that completion's log-probability per token, exactly as a plain forward gives it
    lm = wrap_model(build("llama"), byte_tokenizer(), spec="tiny-llama")
    task = _SolvesSome(data=GSM8K, shots=0)
    items = task.items(6, seed=1)
    generated = Evaluator(lm, task, items, max_new_tokens=6).baseline()
    view = task.for_metric(OWN_METRIC)
    assert isinstance(view, OwnReferenceTask) and view.config() == task.config() | {"scored": "own"}
    own = view.from_generations(items, generated.texts[0], generated.scores["acc"][0])
    done = [i for i, s, t in zip(items, generated.scores["acc"][0], generated.texts[0]) if s > 0 and t.strip()]
    assert 0 < len(own) < len(items) and [i.id for i in own] == [i.id for i in done]
    texts = dict(zip([i.id for i in items], generated.texts[0]))
    assert all(i.target == texts[i.id] for i in own)
    scores = Evaluator(lm, view, own).evaluate([[], [1, lm.layout.n_heads]]).scores[OWN_METRIC]
    expected = [_plain_reference_logprob(lm, item, item.target) for item in own]
    np.testing.assert_allclose(scores[0], expected, atol=2e-5)
    assert not np.allclose(scores[1], expected)
    with pytest.raises(CaplocError, match="own generations"):
        view.items(3)


def test_locate_identifies_on_the_models_own_completions_and_says_how_many_items_it_does():
    lm = wrap_model(build("llama"), byte_tokenizer(), spec="tiny-llama")
    spec = TaskSpec(_SolvesSome(data=GSM8K, shots=0), n=6, n_validate=2, seed=1)
    run = locate(lm, spec, k=2, criterion=Criterion(metric=OWN_METRIC, control="none"),
                 options=LocateOptions(bootstrap=0), evaluation=EvalOptions(max_new_tokens=6, store=False))
    assert run.metric == OWN_METRIC and run.details["screen"]["name"] == "atp"  # teacher-forced: gradients
    assert run.n == run.extra["own_reference"]["drawn"] == 6 and 0 < run.extra["own_reference"]["done"] < 6
    assert [p["k"] for p in run.validation["acc"]] == [2]  # held out: still the real metric by generation
    nothing = TaskSpec("gsm8k", data=GSM8K, shots=0, n=3)  # the tiny model answers none of them
    with pytest.raises(CaplocError, match="does none of the 3 identification items"):
        locate(lm, nothing, k=2, criterion=Criterion(metric=OWN_METRIC, control="none"),
               options=LocateOptions(bootstrap=0), evaluation=EvalOptions(max_new_tokens=4, store=False))
