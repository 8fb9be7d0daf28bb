"""Every ablation path against the reference: zeroing the head's output-projection columns."""

import copy

import pytest
import torch

from caploc import arch
from caploc.ablation import component_ablation
from caploc.masks import Masks
from caploc.components import Head
from caploc.sites import head_site
from tiny import ARCHS, DEVICE, build

TOL = 1e-5


def _ids(batch=3, seq=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, seq), generator=g).to(DEVICE)


def _zeroed_copy(model, heads):
    edited = copy.deepcopy(model)
    head_site(edited).zero_columns(heads)
    return edited


@pytest.mark.parametrize("name", ARCHS)
def test_hooked_equals_weight_zeroing(name):
    model = build(name)
    layout = arch.head_layout(model)
    heads = [Head(0, 1), Head(layout.n_layers - 1, layout.n_heads - 1), Head(1, 0)]
    ids = _ids()
    with torch.no_grad():
        reference = _zeroed_copy(model, heads)(ids).logits
        plain = model(ids).logits
        with component_ablation(model).applied(Masks.from_sets([[layout.index(h) for h in heads]], layout.n_total)):
            hooked = model(ids).logits
    assert (hooked - reference).abs().max().item() <= TOL
    # the test can fail: the ablation really changes the output
    assert (plain - reference).abs().max().item() > 100 * TOL


@pytest.mark.parametrize("name", ARCHS)
def test_rows_in_one_batch_are_independent(name):
    model = build(name)
    layout = arch.head_layout(model)
    sets = [[], [0], [layout.n_total - 1], [1, 2, layout.n_heads]]
    ids = _ids(batch=1).expand(len(sets), -1)
    with torch.no_grad(), component_ablation(model).applied(Masks.from_sets(sets, layout.n_total)):
        batched = model(ids).logits
    for row, indices in enumerate(sets):
        edited = _zeroed_copy(model, [layout.head(i) for i in indices])
        with torch.no_grad():
            alone = edited(ids[:1]).logits[0]
        assert (batched[row] - alone).abs().max().item() <= TOL, f"row {row} ({indices})"


@pytest.mark.parametrize("name", ARCHS)
def test_no_mask_is_bit_identical_to_unhooked(name):
    model = build(name)
    layout = arch.head_layout(model)
    ids = _ids()
    with torch.no_grad():
        plain = model(ids).logits
        ablation = component_ablation(model)
        with ablation.applied(torch.zeros(3, layout.n_total, dtype=torch.bool)):
            empty = model(ids).logits
        with ablation.applied(None):
            cleared = model(ids).logits
    assert torch.equal(plain, empty) and torch.equal(plain, cleared)


@pytest.mark.parametrize("name", ARCHS)
def test_generate_with_kv_cache_matches_weight_zeroing(name):
    model = build(name)
    layout = arch.head_layout(model)
    heads = [Head(1, 2), Head(2, 0)]
    ids = _ids(batch=2, seq=6, seed=3)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        reference = _zeroed_copy(model, heads).generate(ids, **kwargs)
        plain = model.generate(ids, **kwargs)
        # row 0 ablated, row 1 untouched: both in one generate() call
        mask = Masks.from_sets([[layout.index(h) for h in heads], []], layout.n_total)
        with component_ablation(model).applied(mask):
            hooked = model.generate(ids, **kwargs)
    assert torch.equal(hooked[0], reference[0])
    assert torch.equal(hooked[1], plain[1])


def test_mean_ablation_replaces_head_output_by_reference_mean():
    model = build("llama")
    layout = arch.head_layout(model)
    ids = _ids(batch=4, seq=10, seed=5)
    head = Head(1, 3)
    d = layout.head_dim
    proj = arch.attn_out_projs(model)[head.layer]
    captured = []
    handle = proj.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach().clone()))
    with torch.no_grad():
        model(ids)
    handle.remove()
    expected_mean = captured[0][..., head.head * d:(head.head + 1) * d].reshape(-1, d).mean(0)

    ablation = component_ablation(model, mode="mean")

    def run_reference(set_weights):
        set_weights(torch.ones(ids.shape))
        model(ids)

    ablation.fit_means(run_reference)
    assert torch.allclose(ablation.means[head.layer, head.head], expected_mean, atol=1e-6)
    seen = []
    with torch.no_grad(), ablation.applied(Masks.from_sets([[layout.index(head)]], layout.n_total)):
        probe = proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
        model(ids[:1])
        probe.remove()
    # hooks run in registration order: the probe, registered after the ablation hook, sees its output
    sliced = seen[0][0, :, head.head * d:(head.head + 1) * d]
    assert torch.allclose(sliced, expected_mean.expand_as(sliced), atol=1e-6)


def test_unsupported_architecture_is_one_clear_error():
    import transformers as tf

    from caploc import CaplocError

    model = tf.AutoModelForCausalLM.from_config(tf.BloomConfig(vocab_size=50, hidden_size=32, n_layer=1, n_head=2))
    with pytest.raises(CaplocError, match="unsupported architecture 'bloom'"):
        arch.head_layout(model)
