"""The evaluator against independent, unbatched computations on tiny random models."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from caploc import wrap_model
from caploc.evaluator import Evaluator
from caploc.tasks import get_task
from caploc.sites import head_site
from caploc.tasks.base import Item, MultipleChoiceTask
from tiny import ARCHS, build, byte_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"


def _reference_scores(model, tok, item, heads, layout):
    """Log-prob of the target and greedy exact match, from one plain forward of a weight-zeroed copy."""
    edited = copy.deepcopy(model)
    head_site(edited).zero_columns([layout.head(i) for i in heads])
    prompt = tok(item.prefix + item.context)["input_ids"]
    full = tok(item.prefix + item.context + item.target)["input_ids"]
    target = full[len(prompt):]
    with torch.no_grad():
        logits = edited(torch.tensor([full], device=edited.device)).logits[0, len(prompt) - 1:-1].cpu()
    logprob = torch.log_softmax(logits, -1).gather(-1, torch.tensor(target)[:, None]).sum().item()
    greedy = bool((logits.argmax(-1) == torch.tensor(target)).all())
    return logprob, greedy


@pytest.mark.parametrize("name", ARCHS)
def test_prefix_cached_batched_scores_match_plain_forward(name):
    model, tok = build(name), byte_tokenizer()
    lm = wrap_model(model, tok)
    task = get_task("arithmetic", subtask="2D+,3D-", shots=2)
    items = task.items(6, seed=0)
    sets = [[], [0, 5], [lm.layout.n_total - 1]]
    evaluator = Evaluator(lm, task, items, batch_tokens=256)  # small batches: several chunks
    result = evaluator.evaluate(sets)
    evaluator.close()
    for m, heads in enumerate(sets):
        for i, item in enumerate(items):
            logprob, greedy = _reference_scores(model, tok, item, heads, lm.layout)
            assert result.scores["logprob"][m, i] == pytest.approx(logprob, abs=1e-4)
            assert result.scores["acc"][m, i] == float(greedy)
    assert not np.allclose(result.scores["logprob"][0], result.scores["logprob"][1])


def test_results_do_not_depend_on_batching_or_mask_order():
    model, tok = build("llama"), byte_tokenizer()
    lm = wrap_model(model, tok)
    task = get_task("arithmetic", subtask="2D+")
    items = task.items(5)
    sets = [[1], [], [2, 3], [7]]
    big = Evaluator(lm, task, items, batch_tokens=1 << 16).evaluate(sets)
    small = Evaluator(lm, task, items, batch_tokens=64).evaluate(sets[::-1])
    np.testing.assert_allclose(big.scores["logprob"], small.scores["logprob"][::-1], atol=1e-5)
    # duplicate masks in one request are computed once
    ev = Evaluator(lm, task, items)
    ev.evaluate([[1], [1], []])
    assert ev.stats.evaluations == 2


class TinyChoice(MultipleChoiceTask):
    name = "tinychoice"

    def pool(self, seed, needed):
        return [Item(id=str(i), context=f"Pick {i}:", choices=(" a", " bb", " ccc"), label=i % 3)
                for i in range(needed)]


def test_multiple_choice_acc_and_acc_norm():
    model, tok = build("qwen2"), byte_tokenizer()
    lm = wrap_model(model, tok)
    task = TinyChoice()
    items = task.items(4)
    result = Evaluator(lm, task, items).evaluate([[], [3]])
    for i, item in enumerate(items):
        lps = []
        for choice in item.choices:
            prompt = tok(item.context)["input_ids"]
            full = tok(item.context + choice)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([full], device=model.device)).logits[0, len(prompt) - 1:-1].cpu()
            lps.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(full[len(prompt):])[:, None]).sum().item())
        lps = np.array(lps)
        assert result.scores["acc"][0, i] == float(lps.argmax() == item.label)
        norm = lps / np.array([len(c) for c in item.choices])
        assert result.scores["acc_norm"][0, i] == float(norm.argmax() == item.label)
        assert result.scores["logprob"][0, i] == pytest.approx(lps[item.label], abs=1e-4)


def test_generation_task_matches_weight_zeroed_generate():
    model, tok = build("llama"), byte_tokenizer()
    lm = wrap_model(model, tok)
    task = get_task("gsm8k", data=str(FIXTURES / "gsm8k_mini.jsonl"), shots=1)
    items = task.items(3)
    heads = [2, 5]
    evaluator = Evaluator(lm, task, items, max_new_tokens=6)
    result = evaluator.evaluate([[], heads])
    reference = _generate_reference(lm, items, heads, max_new_tokens=6)
    for m in range(2):
        for i in range(len(items)):
            assert result.texts[m][i] == task.cut_at_stop(reference[m][i])
    assert set(result.scores) == {"acc", "acc_strict"}  # lm-eval's flexible-extract and strict-match


def _generate_reference(lm, items, heads, max_new_tokens):
    """What HF `generate()` writes for each item: texts[0] unablated, texts[1] on the model whose `heads` are
    zeroed in the weights."""
    edited = copy.deepcopy(lm.model)
    head_site(edited).zero_columns([lm.layout.head(i) for i in heads])
    tok = lm.tokenizer
    texts = [[], []]
    for item in items:
        ids = torch.tensor([tok(item.prefix + item.context)["input_ids"]], device=edited.device)
        for m, model in enumerate((lm.model, edited)):
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            texts[m].append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return texts


def test_mean_ablation_evaluator_differs_from_zero():
    model, tok = build("llama"), byte_tokenizer()
    lm = wrap_model(model, tok)
    task = get_task("arithmetic", subtask="2D+")
    items = task.items(4)
    zero = Evaluator(lm, task, items).evaluate([[], [4]])
    mean = Evaluator(lm, task, items, mode="mean").evaluate([[], [4]])
    np.testing.assert_array_equal(zero.scores["logprob"][0], mean.scores["logprob"][0])
    assert not np.allclose(zero.scores["logprob"][1], mean.scores["logprob"][1])


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_a_subset_scores_its_leading_items_as_the_whole_does_and_counts_into_its_stats(mode):
    """`Evaluator.subset(n)`: the first n items' scores under any mask are the whole evaluator's (mean
    ablation keeping the whole reference's means), and what it computes shows in the whole's counters."""
    model, tok = build("llama"), byte_tokenizer()
    lm = wrap_model(model, tok)
    task = get_task("arithmetic", subtask="2D+")
    whole = Evaluator(lm, task, task.items(6, seed=0), mode=mode)
    sets = [[], [4], [1, 6]]
    expected = whole.evaluate(sets).scores["logprob"][:, :3]
    before = whole.stats.evaluations
    leading = whole.subset(3)
    assert [i.id for i in leading.items] == [i.id for i in whole.items[:3]]
    np.testing.assert_allclose(leading.evaluate(sets).scores["logprob"], expected, atol=1e-5)
    assert whole.stats.evaluations == before + 3 and leading.stats is whole.stats


class UnevenChoice(MultipleChoiceTask):
    name = "unevenchoice"

    def pool(self, seed, needed):
        return [Item(id=str(i), context="Pick" + " one" * (1 + 3 * i) + ":", choices=(" a", " bb c", " ddd"),
                     label=i % 3) for i in range(needed)]


def test_prefix_groups_are_packed_by_length_with_less_padding_than_item_order():
    """Every group in exactly one pack, each pack within PACK_TOKENS, and fewer padded tokens than packing the
    groups in item order (prefix lengths alternating short and long)."""
    from caploc.evaluator.requests import Requests
    from caploc.evaluator.scoring import PACK_TOKENS, _packs

    task = UnevenChoice()
    items = [task.items(40)[i] for i in [j // 2 if j % 2 else 39 - j // 2 for j in range(40)]]
    requests = Requests(byte_tokenizer(), task, items)
    assert requests.packed
    groups = [(p, m) for p, m in requests.prefix_groups().items() if p]

    def padded(pack):
        suffix = max(len(requests.sequences[s].context) + len(requests.sequences[s].continuation) - 1
                     for _, members in pack for s in members)
        return len(pack) * max(len(p) for p, _ in pack) + sum(len(m) for _, m in pack) * suffix

    packs = _packs(groups, requests)
    assert sorted(s for pack in packs for _, m in pack for s in m) == sorted(s for _, m in groups for s in m)
    assert all(padded(pack) <= PACK_TOKENS or len(pack) == 1 for pack in packs)
    in_order, current = [], []  # the packing this replaced: consecutive groups up to PACK_TOKENS
    for group in groups:
        if current and padded(current + [group]) > PACK_TOKENS:
            in_order.append(current)
            current = []
        current.append(group)
    in_order.append(current)
    assert sum(map(padded, packs)) < 0.8 * sum(map(padded, in_order))


@pytest.mark.parametrize("later_layers", [False, True])
@pytest.mark.parametrize("name", ARCHS)
def test_packed_multiple_choice_prefixes_match_plain_forward(name, later_layers):
    # items of different lengths share passes (left-padded prefixes, one per item): every choice's score
    # under every mask equals a plain forward of the weight-zeroed model; with no mask below layer 1 the
    # passes start there from the pack's unablated states (the K/V of the layers below handed to the cache)
    model, tok = build(name), byte_tokenizer()
    lm = wrap_model(model, tok)
    task = UnevenChoice()
    items = task.items(5)
    per_layer = lm.layout.n_total // lm.layout.n_layers
    sets = [[], [per_layer + 1, lm.layout.n_total - 1], [lm.layout.n_total - 2]] if later_layers else \
        [[], [1, 6], [lm.layout.n_total - 2]]
    evaluator = Evaluator(lm, task, items)
    result = evaluator.evaluate(sets)
    reused = [u is not None for u in evaluator.scorer._unablated_packs.values()]
    if later_layers:  # sliding-window caches keep only their window: no K/V to hand back, no reuse
        assert reused and all(reused) == (name not in ("gemma2", "gemma3_text"))
    else:
        assert not reused
    for m, heads in enumerate(sets):
        edited = copy.deepcopy(model)
        head_site(edited).zero_columns([lm.layout.head(i) for i in heads])
        for i, item in enumerate(items):
            prompt = tok(item.context)["input_ids"]
            full = tok(item.context + item.choices[item.label])["input_ids"]
            with torch.no_grad():
                logits = edited(torch.tensor([full], device=edited.device)).logits[0, len(prompt) - 1:-1].cpu()
            expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(full[len(prompt):])[:, None]).sum().item()
            assert result.scores["logprob"][m, i] == pytest.approx(expected, abs=1e-4), (m, i)


def test_packed_control_items_start_at_the_first_ablated_layer_on_the_real_model(smollm, monkeypatch):
    """`general` (one prefix per item, packed) under head sets from layer 10 up, on the embedded SmolLM2: the
    passes start at layer 10 from the packs' unablated states, with the scores of running every layer."""
    import caploc.evaluator.scoring as scoring

    task = get_task("general")
    items = task.items(12)
    sets = [[smollm.layout.index(smollm.layout.parse(h)) for h in heads]
            for heads in (("L10H1", "L20H3"), ("L12H0",), ("L29H8", "L15H2", "L10H4"))]
    reusing = Evaluator(smollm, task, items)
    got = reusing.evaluate(sets).scores["logprob"]
    assert reusing.scorer._unablated_packs and all(u is not None for u in reusing.scorer._unablated_packs.values())
    monkeypatch.setattr(scoring, "LAYER_REUSE_BYTES", 0)
    every_layer = Evaluator(smollm, task, items)
    expected = every_layer.evaluate(sets).scores["logprob"]
    assert not any(u is not None for u in every_layer.scorer._unablated_packs.values())
    np.testing.assert_allclose(got, expected, atol=2e-4)


def test_a_greedy_round_on_the_real_model_starts_where_its_masks_part_from_the_first(smollm, monkeypatch):
    """GSM8K's reference log-probability (2-shot, the fixture's problems) on the embedded SmolLM2, one mask per
    pass: a round of candidates on top of a set held in layers 8 and 12. The first mask scored is a late
    candidate whose hidden states are kept; the others start where they part from it, with the scores of
    each starting at its own first layer, at fewer tokens."""
    from pathlib import Path

    from caploc.evaluator import core

    task = get_task("gsm8k", data=str(Path(__file__).parent / "fixtures" / "gsm8k_mini.jsonl"), shots=2)
    task = task.for_metric("ref_logprob")
    items = task.items(3)
    layout = smollm.layout
    held = [layout.index(layout.parse(h)) for h in ("L8H1", "L12H4")]
    sets = [held + [layout.index(layout.parse(h))] for h in ("L3H0", "L9H2", "L14H5", "L20H1", "L25H3", "L27H0",
                                                              "L29H8")]

    def round_tokens(evaluator):
        evaluator.baseline()
        before = evaluator.stats.tokens
        return evaluator.evaluate(sets).scores["ref_logprob"], evaluator.stats.tokens - before

    based, based_tokens = round_tokens(Evaluator(smollm, task, items, batch_tokens=64))
    monkeypatch.setattr(core, "MAX_PLANNED", 0)
    plain, plain_tokens = round_tokens(Evaluator(smollm, task, items, batch_tokens=64))
    np.testing.assert_allclose(based, plain, atol=2e-4)
    assert based_tokens < 0.8 * plain_tokens


def test_generation_shares_the_few_shot_prefix_and_writes_what_it_would_without(smollm, monkeypatch):
    """The few-shot prefix runs once per mask and its KV cache serves every item; the texts are the ones the
    full prompts give (real model, 2-shot GSM8K, an ablated mask too)."""
    from pathlib import Path

    import caploc.evaluator.requests as requests_module
    from caploc.tasks import get_task

    task = get_task("gsm8k", data=str(Path(__file__).parent / "fixtures" / "gsm8k_mini.jsonl"), shots=2)
    items = task.items(3)
    masks = np.zeros((2, smollm.layout.n_total), dtype=bool)
    masks[1, [smollm.layout.index(smollm.layout.parse(h)) for h in ("L1H4", "L11H7", "L20H3")]] = True
    shared = Evaluator(smollm, task, items, max_new_tokens=24)
    groups = shared.requests.generation_groups
    assert len(groups) == 1 and len(groups[0][0]) > 100  # the 2-shot prefix is shared
    with_sharing = shared.evaluate(masks)
    monkeypatch.setattr(requests_module, "MIN_SHARED_PREFIX", 10**9)
    plain = Evaluator(smollm, task, items, max_new_tokens=24)
    assert plain.requests.generation_groups[0][0] == ()
    without = plain.evaluate(masks)
    assert with_sharing.texts == without.texts
    assert with_sharing.texts[0] != with_sharing.texts[1] or with_sharing.texts[0][0]  # it wrote something
    assert shared.stats.tokens < plain.stats.tokens


@pytest.mark.parametrize("arch", ARCHS)
def test_generation_drops_finished_rows_and_writes_what_generate_writes(arch):
    """caploc's own greedy loop (rows leave the batch when they finish, with their cache and mask rows) writes
    what HF `generate()` writes on the weight-zeroed model, on every architecture (sliding-window caches too)."""
    model, tok = build(arch), byte_tokenizer()
    lm = wrap_model(model, tok)
    task = get_task("gsm8k", data=str(FIXTURES / "gsm8k_mini.jsonl"), shots=0)  # short prompts: GPT-2 has 512 positions
    task.stop = ("e", "Question:")  # a common letter: rows finish at different steps
    items = task.items(3)
    heads = [1, 3]
    evaluator = Evaluator(lm, task, items, max_new_tokens=12)
    result = evaluator.evaluate([[], heads])
    reference = _generate_reference(lm, items, heads, max_new_tokens=12)
    stopped_early = []
    for m in range(2):
        for i, full in enumerate(reference[m]):
            expected = task.cut_at_stop(full)
            assert result.texts[m][i] == expected, (arch, m, i)
            stopped_early.append(len(expected) < len(full))  # this row wrote a stop string before the last step
    generated = evaluator.stats.tokens - sum(len(tok(i.prefix + i.context)["input_ids"]) for i in items) * 2
    assert generated <= 2 * len(items) * 12
    if any(stopped_early):
        assert generated < 2 * len(items) * 12  # the rows that finished left the batch


def test_a_cache_layer_with_room_holds_what_a_dynamic_layer_holds_and_writes_in_place():
    """Generation's cache layers take a decode step without copying the cache: through appends past their room,
    dropped and repeated rows and a crop they hold the K/V a DynamicLayer holds, and reads see them."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    from caploc.evaluator.generation import _RoomyLayer, _with_room

    torch.manual_seed(0)
    prompt = [torch.randn(4, 2, 5, 3) for _ in range(2)]
    plain = DynamicLayer()
    plain.update(*prompt)
    cache = DynamicCache()
    cache.layers[:] = [DynamicLayer()]
    cache.layers[0].update(*prompt)
    roomy = _with_room(cache, room=3).layers[0]
    assert isinstance(roomy, _RoomyLayer)
    steps = [("update", 1), ("update", 1), ("select", torch.tensor([0, 2, 3])), ("update", 2), ("repeat", 2),
             ("update", 1), ("crop", -2), ("update", 1)]
    for op, arg in steps:  # the room (3) runs out at the fourth step, and grows
        if op == "update":
            new = [torch.randn(plain.keys.shape[0], 2, arg, 3) for _ in range(2)]
            for a, b in zip(roomy.update(*new), plain.update(*new)):
                assert torch.equal(a, b)
        elif op == "select":
            roomy.batch_select_indices(arg), plain.batch_select_indices(arg)
        elif op == "repeat":
            roomy.batch_repeat_interleave(arg), plain.batch_repeat_interleave(arg)
        else:
            roomy.crop(arg), plain.crop(arg)
        assert torch.equal(roomy.keys, plain.keys) and torch.equal(roomy.values, plain.values), op
        assert roomy.get_seq_length() == plain.get_seq_length()
    buffer = roomy._buffers[0].data_ptr()
    roomy.update(*[torch.zeros(roomy.keys.shape[0], 2, 1, 3) for _ in range(2)])
    assert roomy._buffers[0].data_ptr() == buffer  # a step with room left writes into the same buffer


def test_length_chunks_are_the_cheapest_cut_of_the_sorted_rows():
    """Rows sorted longest first are cut where padded tokens plus the per-chunk overhead are fewest (against
    every cut of the sorted order), each chunk within the budget unless one row alone exceeds it."""
    import itertools

    from caploc.evaluator.requests import Requests, Sequence

    rng = np.random.default_rng(0)
    for trial in range(30):
        n = int(rng.integers(1, 10))
        lengths = rng.integers(5, 400, n)
        requests = object.__new__(Requests)
        requests.sequences = [Sequence(i, 0, (), [1] * int(length - 1), [2]) for i, length in enumerate(lengths)]
        budget, overhead = int(rng.integers(300, 1500)), int(rng.integers(0, 300))
        chunks = requests.length_chunks(list(range(n)), budget, overhead=overhead)
        assert sorted(s for c in chunks for s in c) == list(range(n))
        assert all(len(c) * requests.row_tokens(c) <= budget or len(c) == 1 for c in chunks)

        def cost(parts):
            return sum(len(c) * requests.row_tokens(c) + overhead for c in parts)

        order = sorted(range(n), key=lambda s: -lengths[s])
        best = np.inf
        for cuts in itertools.product([False, True], repeat=n - 1):
            parts, current = [], [order[0]]
            for s, cut in zip(order[1:], cuts):
                if cut:
                    parts.append(current)
                    current = []
                current.append(s)
            parts.append(current)
            if all(len(c) * requests.row_tokens(c) <= budget or len(c) == 1 for c in parts):
                best = min(best, cost(parts))
        assert cost(chunks) == best
