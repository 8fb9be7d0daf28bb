"""The evaluator's shortcuts (shared prefix without copies, layer reuse) against plain forward passes."""

import copy

import numpy as np
import pytest
import torch

from caploc import wrap_model
from caploc.evaluator import Evaluator, shortcuts
from caploc.masks import Masks
from caploc.sites import head_site
from caploc.tasks import get_task
from tiny import ARCHS, build, byte_tokenizer


def _reference_attention(q, k, v, scaling, window, softcap, prefix, rows_per_prefix):
    """Causal attention over the concatenation [prefix | own keys], in float64, one head at a time."""
    rows, heads, length, _ = q.shape
    group = heads // k.shape[1]
    if prefix is not None:
        pk, pv = (x.repeat_interleave(rows_per_prefix, dim=0) for x in prefix)
        k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
    p_len = k.shape[2] - length
    out = torch.zeros(q.shape, dtype=torch.float64)
    for h in range(heads):
        scores = q[:, h].double() @ k[:, h // group].double().transpose(-1, -2) * scaling
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        query_pos = torch.arange(length)[:, None] + p_len
        key_pos = torch.arange(k.shape[2])[None]
        allowed = key_pos <= query_pos
        if window is not None:
            allowed &= (query_pos - key_pos) < window
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[:, h] = torch.softmax(scores, -1) @ v[:, h // group].double()
    return out


@pytest.mark.parametrize("window,softcap", [(None, None), (6, None), (None, 5.0), (3, 5.0)])
@pytest.mark.parametrize("with_prefix", [True, False])
@pytest.mark.parametrize("length", [1, 5])  # one query (generation) sees every prefix key
def test_attention_over_a_shared_prefix_equals_attention_over_the_concatenation(window, softcap, with_prefix,
                                                                                length):
    torch.manual_seed(0)
    groups, per_group, heads, kv_heads, p_len, dim = 3, 4, 6, 2, 7, 8
    rows = groups * per_group
    q = torch.randn(rows, heads, length, dim)
    k, v = torch.randn(rows, kv_heads, length, dim), torch.randn(rows, kv_heads, length, dim)
    prefix = (torch.randn(groups, kv_heads, p_len, dim), torch.randn(groups, kv_heads, p_len, dim))
    prefix = prefix if with_prefix else None
    got = shortcuts.attend(q, k, v, 0.3, window, softcap, prefix, per_group)
    expected = _reference_attention(q, k, v, 0.3, window, softcap, prefix, per_group)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stacked_query_heads_compute_what_the_kernel_s_own_grouped_attention_does_bit_for_bit(monkeypatch, dtype):
    """On CPUs the query heads of one kv head run as one head's stacked queries: the same outputs and query
    gradients in bf16 too (stored scores stay valid), and K/V gradients equal up to the order of a sum."""
    torch.manual_seed(2)
    groups, per_group, heads, kv_heads, length, p_len, dim = 2, 3, 6, 2, 9, 40, 16
    rows = groups * per_group
    inputs = [torch.randn(rows, heads, length, dim, dtype=dtype),
              *[torch.randn(rows, kv_heads, length, dim, dtype=dtype) for _ in range(2)],
              *[torch.randn(groups, kv_heads, p_len, dim, dtype=dtype) for _ in range(2)]]
    weights = torch.randn(rows, heads, length, dim, dtype=dtype)

    def run():
        leaves = [x.clone().requires_grad_(True) for x in inputs]
        q, k, v, pk, pv = leaves
        out = shortcuts.attend(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, 0.3, None, None, (pk, pv),
                               per_group)  # the strides the model's queries have
        return out, torch.autograd.grad((out * weights).sum(), leaves)

    stacked, stacked_grads = run()
    monkeypatch.setattr(shortcuts, "GROUPED_MASK_ELEMENTS", 0)  # the kernel's own GQA
    own, own_grads = run()
    assert torch.equal(stacked, own)
    assert torch.equal(stacked_grads[0], own_grads[0])
    for a, b in zip(stacked_grads[1:], own_grads[1:]):  # K/V: the query heads' shares add up in another order
        assert (a.double() - b.double()).abs().max() <= 4 * torch.finfo(dtype).eps * b.double().abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ARCHS)
def test_every_architecture_passes_the_check(name, dtype):
    """In bf16 too: there the check compares predicted distributions, since rounding alone moves far-tail
    log-probabilities by more than a nat (a 0.3-nat bound refused SmolLM2 in bf16 and turned both savings off)."""
    assert shortcuts.shortcuts(wrap_model(build(name).to(dtype), byte_tokenizer())) == shortcuts.Shortcuts(True, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_attention_that_ignores_the_prefix_fails_the_check_in_any_precision(monkeypatch, dtype):
    original = shortcuts.attend
    monkeypatch.setattr(shortcuts, "attend", lambda q, k, v, scaling, window, softcap, prefix, n:
                        original(q, k, v, scaling, window, softcap, None, n))
    assert not shortcuts.shortcuts(wrap_model(build("llama").to(dtype), byte_tokenizer())).shared_prefix


def test_a_model_whose_attention_ignores_the_prefix_fails_the_check_and_is_evaluated_by_copies(monkeypatch):
    """The check compares against the plain forward, so a wrong partial attention is never used."""
    model, tok = build("llama"), byte_tokenizer()
    original = shortcuts.attend
    monkeypatch.setattr(shortcuts, "attend", lambda q, k, v, scaling, window, softcap, prefix, n:
                        original(q, k, v, scaling, window, softcap, None, n))
    lm = wrap_model(model, tok)
    assert not shortcuts.shortcuts(lm).shared_prefix
    task = get_task("arithmetic", subtask="2D+", shots=2)
    items = task.items(3)
    result = Evaluator(lm, task, items).evaluate([[], [5]])
    monkeypatch.setattr(shortcuts, "attend", original)
    fresh = wrap_model(copy.deepcopy(model), tok)  # checked again: a model is checked once
    np.testing.assert_allclose(result.scores["logprob"], Evaluator(fresh, task, items).evaluate([[], [5]])
                               .scores["logprob"], atol=1e-5)


def _weight_zeroed_logprobs(lm, evaluator, heads):
    edited = copy.deepcopy(lm.model)
    head_site(edited).zero_columns([lm.layout.head(i) for i in heads])
    out = []
    for seq in evaluator.requests.sequences:
        full = list(seq.prefix) + seq.context + seq.continuation
        with torch.no_grad():
            logits = edited(torch.tensor([full], device=edited.device)).logits[0].cpu()
        logprobs = torch.log_softmax(logits[len(full) - len(seq.continuation) - 1:-1], -1)
        out.append(logprobs.gather(-1, torch.tensor(seq.continuation)[:, None]).sum().item())
    return np.array(out)


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("task_name,options", [("arithmetic", {"subtask": "2D+", "shots": 2}), ("induction", {})])
def test_rows_that_start_at_their_first_ablated_layer_equal_weight_zeroing(name, task_name, options):
    """Masks evaluated one per pass start at their own first layer (with and without a shared prefix):
    the scores equal the weight-zeroed model's, and the pass costs fewer tokens than a full one."""
    model, tok = build(name), byte_tokenizer()
    lm = wrap_model(model, tok)
    task = get_task(task_name, **options)
    items = task.items(3, seed=1)
    per_head = lm.layout.n_heads
    sets = [[per_head * layer + 1] for layer in range(lm.layout.n_layers)] + [[per_head + 2, 2 * per_head]]
    evaluator = Evaluator(lm, task, items, batch_tokens=64)  # one mask per pass
    assert evaluator.scorer.masks_per_pass(evaluator.requests) == 1
    result = evaluator.evaluate(sets)
    for m, heads in enumerate(sets):
        expected = _weight_zeroed_logprobs(lm, evaluator, heads)
        np.testing.assert_allclose(result.scores["logprob"][m], expected, atol=1e-4, err_msg=str(heads))
    assert evaluator.scorer.first_layer(evaluator.masks([sets[-1]])) == 1
    full = Evaluator(lm, task, items, batch_tokens=64)
    full.evaluate([[0]])  # starts at layer 0
    late = Evaluator(lm, task, items, batch_tokens=64)
    late.evaluate([[lm.layout.n_total - 1]])  # computes the unablated states once
    before = late.stats.tokens
    late.evaluate([[lm.layout.n_total - 2]])  # the last layer only
    assert 0 < late.stats.tokens - before <= full.stats.tokens // lm.layout.n_layers + 1


def test_a_softcapped_model_that_transformers_ran_through_sdpa_runs_the_capped_eager_attention():
    """Gemma 2 caps its attention scores. transformers before about 5.2 ran it through `sdpa`, which drops the
    cap (5.17 on a GPU machine: scores 3e-5 off caploc's attention, which keeps it); newer versions refuse.
    Wrapped, the model runs eager, and the evaluator's own attention equals weight zeroing."""
    model = build("gemma2")
    model.config._attn_implementation = "sdpa"  # what the older versions chose for it
    lm = wrap_model(model, byte_tokenizer())
    assert model.config._attn_implementation == "eager"
    task = get_task("arithmetic", subtask="2D+", shots=2)
    evaluator = Evaluator(lm, task, task.items(3, seed=1))
    heads = [lm.layout.n_heads + 1]
    expected = _weight_zeroed_logprobs(lm, evaluator, heads)
    np.testing.assert_allclose(evaluator.evaluate([heads]).scores["logprob"][0], expected, atol=1e-5)


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("task_name,options,per_pass", [("arithmetic", {"subtask": "2D+", "shots": 2}, 1),
                                                         ("arithmetic", {"subtask": "2D+", "shots": 2}, 3),
                                                         ("induction", {}, 1)])
def test_a_greedy_round_s_masks_start_where_they_part_from_the_first_one_scored(name, task_name, options,
                                                                                per_pass, monkeypatch):
    """A greedy round: a set held in layer 0 plus one candidate each, in layers 0-3. The evaluator scores one
    of the layer-3 candidates first with its hidden states kept, and the others start where they part from
    it, from its states (one mask per pass, and three): every score equals the weight-zeroed model's and the
    round costs fewer tokens than with each mask starting at its own first layer; the states are dropped
    when the evaluation ends."""
    from caploc.evaluator import core

    lm = wrap_model(build(name), byte_tokenizer())
    task = get_task(task_name, **options)
    items = task.items(3, seed=1)
    per_head, layers = lm.layout.n_heads, lm.layout.n_layers
    held = [1]
    candidates = [0, per_head + 2, 2 * per_head + 1, 2 * per_head + 3] + [(layers - 1) * per_head + h for h in (0, 2, 3)]
    sets = [held + [c] for c in candidates]
    probe = Evaluator(lm, task, items, batch_tokens=64)  # the smallest batch that holds per_pass masks
    while probe.scorer.masks_per_pass(probe.requests) < per_pass:
        probe.scorer.batch_tokens += 16
    batch_tokens = probe.scorer.batch_tokens
    based = Evaluator(lm, task, items, batch_tokens=batch_tokens)
    assert based.scorer.masks_per_pass(based.requests) == per_pass
    based.baseline()
    before = based.stats.tokens
    result = based.evaluate(sets)
    based_tokens = based.stats.tokens - before
    assert based.scorer._base is None
    for m, heads in enumerate(sets):
        expected = _weight_zeroed_logprobs(lm, based, heads)
        np.testing.assert_allclose(result.scores["logprob"][m], expected, atol=1e-4, err_msg=str(heads))
    monkeypatch.setattr(core, "MAX_PLANNED", 0)
    plain = Evaluator(lm, task, items, batch_tokens=batch_tokens)
    plain.baseline()
    before = plain.stats.tokens
    np.testing.assert_allclose(plain.evaluate(sets).scores["logprob"], result.scores["logprob"], atol=1e-5)
    assert based_tokens < plain.stats.tokens - before


def test_a_base_mask_is_taken_for_a_few_layers_when_each_mask_has_its_own_pass_and_for_a_mask_s_worth_when_shared():
    """Three layers; a set in layer 0 and two candidates in layer 2. With one candidate first the other skips
    2 layers: worth it when every mask has a pass of its own (the base costs a copy of its states), not when
    the two share one pass (4 layer passes instead of 6, less than a whole mask's 3 saved)."""
    lm = wrap_model(build("llama"), byte_tokenizer())
    scorer = Evaluator(lm, get_task("induction"), get_task("induction").items(2)).scorer
    per_head = lm.layout.n_heads
    rows = np.zeros((2, lm.layout.n_total), dtype=bool)
    rows[:, 1] = True
    rows[[0, 1], [2 * per_head + 1, 2 * per_head + 2]] = True
    assert lm.layout.n_layers == 3
    assert scorer.base_plan(Masks(rows), per_pass=1) in (0, 1)
    assert scorer.base_plan(Masks(rows), per_pass=2) is None


@pytest.mark.parametrize("window,softcap", [(None, None), (6, None), (3, 5.0)])
def test_attention_over_a_shared_prefix_has_the_gradient_of_the_concatenation(window, softcap):
    """Under autograd (the gradient screen) the two-part attention is differentiated through the shared
    prefix's K/V: every input's gradient equals the float64 reference's."""
    torch.manual_seed(1)
    groups, per_group, heads, kv_heads, length, p_len, dim = 2, 3, 4, 2, 5, 7, 8
    rows = groups * per_group
    inputs = [torch.randn(rows, heads, length, dim, dtype=torch.float64), *[
        torch.randn(rows, kv_heads, length, dim, dtype=torch.float64) for _ in range(2)],
        *[torch.randn(groups, kv_heads, p_len, dim, dtype=torch.float64) for _ in range(2)]]
    for x in inputs:
        x.requires_grad_(True)
    q, k, v, pk, pv = inputs
    weights = torch.randn(rows, heads, length, dim, dtype=torch.float64)
    got = torch.autograd.grad((shortcuts.attend(q, k, v, 0.3, window, softcap, (pk, pv), per_group) * weights).sum(),
                              inputs)
    expected = torch.autograd.grad((_reference_attention(q, k, v, 0.3, window, softcap, (pk, pv), per_group)
                                    * weights).sum(), inputs)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-9, rtol=1e-9)


def _whole_row_gradients(lm, evaluator, metric, ablated=()):
    """The reference: every sequence a row with its whole prompt (no shared prefix), per item."""
    runner = evaluator.gradient_runner
    weights = evaluator._metric_weights(metric)
    base = torch.ones(lm.layout.n_total, dtype=torch.float64)
    base[list(ablated)] = 0.0
    out = np.zeros((len(evaluator.requests.sequences), lm.layout.n_total))
    runner._whole_row_gradients(evaluator.requests, list(range(len(out))), weights, base, out, np.zeros(len(out)))
    per_item = np.zeros((len(evaluator.items), lm.layout.n_total))
    np.add.at(per_item, [s.item for s in evaluator.requests.sequences], out)
    return per_item


@pytest.mark.parametrize("name", ARCHS)
def test_gradients_through_a_shared_prefix_keep_the_item_mean_exact(name):
    """A few-shot prefix shared by the items runs once per pass, with multipliers of its own: the item-mean
    gradient (what the screen ranks by) equals running every item with its whole prompt, with and without
    heads held at 0, and costs a fraction of its tokens."""
    lm = wrap_model(build(name).double(), byte_tokenizer(), spec=f"{name}-fp64")
    task = get_task("arithmetic", subtask="2D+", shots=2)
    items = task.items(5, seed=2)
    evaluator = Evaluator(lm, task, items)
    groups = evaluator.requests.prefix_groups()
    prefix, members = next(iter(groups.items()))
    assert len(groups) == 1 and len(prefix) >= 16  # the shared path is the one under test
    # a budget of about one row per backward (the gradient pass takes a quarter of what the prefix leaves):
    # the chunks' gradients meet at the prefix's K/V
    row = evaluator.requests.row_tokens(members, True)
    small = Evaluator(lm, task, items, batch_tokens=len(prefix) + 4 * row)
    assert len(small.requests.length_chunks(members, row, True)) > 1
    for ablated in ([], [1, lm.layout.n_heads + 2]):
        whole = _whole_row_gradients(lm, evaluator, "logprob", ablated)
        assert np.abs(whole.mean(0)).max() > 1e-3
        for ev in (evaluator, small):
            shared = ev.gradients("logprob", ablated=ablated or None)
            np.testing.assert_allclose(shared.mean(0), whole.mean(0), atol=1e-6, rtol=1e-5)  # rotary runs in fp32
            if ablated:
                assert np.abs(shared[:, ablated]).max() > 0  # held at 0, still differentiated
    costs = []
    for run in (lambda: evaluator.gradients("logprob"), lambda: _whole_row_gradients(lm, evaluator, "logprob")):
        before = evaluator.stats.gradient_tokens
        run()
        costs.append(evaluator.stats.gradient_tokens - before)
    assert costs[0] < 0.6 * costs[1]


def test_sequences_a_metric_does_not_use_are_not_run():
    """`logprob` of a multiple-choice item is the correct choice's: the other choices cost no gradient."""
    lm = wrap_model(build("llama"), byte_tokenizer(), spec="tiny")
    task = get_task("general")
    items = task.items(4)
    evaluator = Evaluator(lm, task, items)
    weights = evaluator._metric_weights("logprob")
    assert sorted(set(weights.tolist())) == [0.0, 1.0] and weights.sum() == len(items)
    np.testing.assert_allclose(evaluator._metric_weights("logprob_all")[weights == 1],
                               [1 / len(i.choices) for i in items])
    evaluator.gradients("logprob")
    answers = [s for s, w in zip(evaluator.requests.sequences, weights) if w]
    assert evaluator.stats.gradient_tokens == 3 * sum(len(s.prefix) + len(s.context) + len(s.continuation)
                                                      for s in answers)
