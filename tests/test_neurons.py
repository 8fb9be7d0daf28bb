"""Neuron components: exact ablation, enhancement, and CNL recovering planted neurons."""

import copy

import numpy as np
import pytest
import torch
import transformers as tf

from caploc import CaplocError, CNLOptions, EvalOptions, TaskSpec, arch, wrap_model
from caploc.ablation import component_ablation
from caploc.experiments.neurons import neuron_attributions, neurons, overlap_stats, select_commonality
from caploc.evaluator import Evaluator
from caploc.arch import neuron_layout
from caploc.components import Neuron
from caploc.sites import neuron_site
from caploc.store import EvalStore
from tiny import ARCHS, DEVICE, PlantedTask, build, byte_tokenizer

PLANTED_NEURONS = [Neuron(1, 7), Neuron(2, 40), Neuron(3, 90)]


@pytest.mark.parametrize("name", ARCHS)
def test_neuron_ablation_equals_zeroing_down_projection_columns(name):
    model = build(name)
    layout = neuron_layout(model)
    chosen = [Neuron(0, 3), Neuron(1, 50), Neuron(2, layout.n_units - 1)]
    ids = torch.randint(0, 256, (1, 12)).to(model.device)
    edited = copy.deepcopy(model)
    neuron_site(edited).zero_columns(chosen)
    mask = torch.zeros(2, layout.n_total, dtype=torch.bool)
    mask[0, [layout.index(n) for n in chosen]] = True
    with torch.no_grad():
        reference, plain = edited(ids).logits, model(ids).logits
        with component_ablation(model, "neurons").applied(mask):
            hooked = model(ids.expand(2, -1)).logits
    assert (hooked[0] - reference[0]).abs().max().item() <= 1e-5
    if DEVICE.type == "cpu":
        assert torch.equal(hooked[1], plain[0])  # the other row is untouched
    else:  # a GPU's matrix products pick kernels by batch shape: rows of a batch of 2 and of 1 agree to rounding
        assert (hooked[1] - plain[0]).abs().max().item() <= 1e-5
    assert (plain - reference).abs().max().item() > 1e-4


def test_neuron_names():
    layout = neuron_layout(build("llama"))
    assert layout.n_units == 96 and layout.n_total == 3 * 96
    assert layout.parse("L2N95") == Neuron(2, 95) and str(layout.neuron(96 + 5)) == "L1N5"
    with pytest.raises(CaplocError, match="does not exist"):
        layout.parse("L3N0")
    with pytest.raises(CaplocError, match="not a neuron name"):
        layout.parse("L1H2")


def test_enhancement_scales_activations():
    model = build("llama")
    lm = wrap_model(model, byte_tokenizer(), spec="tiny")
    task = PlantedTask(model, lm.tokenizer)
    items = task.items(6)
    layout = neuron_layout(model)
    chosen = [layout.index(Neuron(1, 3)), layout.index(Neuron(2, 9))]
    enhanced = Evaluator(lm, task, items, components="neurons", scale=3.0)
    scores = enhanced.evaluate([chosen]).scores["logprob"][0]
    enhanced.close()
    doubled = copy.deepcopy(model)
    with torch.no_grad():
        for n in (Neuron(1, 3), Neuron(2, 9)):
            arch.mlp_down_projs(doubled)[n.layer].weight[:, n.unit] *= 3
    reference = Evaluator(wrap_model(doubled, lm.tokenizer), task, items)
    expected = reference.evaluate([[]]).scores["logprob"][0]
    reference.close()
    np.testing.assert_allclose(scores, expected, atol=1e-4)
    assert enhanced.key()["scale"] == 3.0 and enhanced.key()["components"] == "neurons"


def planted_neuron_model():
    torch.manual_seed(1)
    config = tf.LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                            tie_word_embeddings=False)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    keep = {(n.layer, n.unit) for n in PLANTED_NEURONS}
    with torch.no_grad():
        for layer, proj in enumerate(arch.mlp_down_projs(model)):
            for unit in range(128):
                if (layer, unit) not in keep:
                    proj.weight[:, unit] = 0
                else:
                    proj.weight[:, unit] *= 6
    return model


def test_select_commonality_rule():
    attr = np.array([[5.0, 4.0, -9.0, 0.0], [5.0, 0.0, -9.0, 3.0], [5.0, 1.0, -9.0, 0.0]])
    # top half per item (2 neurons), positive only: neuron 0 in 3/3 items, 1 in 2/3, 3 in 1/3; 2 never
    assert select_commonality(attr, top_q=0.5, min_share=0.5) == [0, 1]
    assert select_commonality(attr, top_q=0.5, min_share=1.0) == [0]
    assert overlap_stats([0, 1], [1, 2]) == {"n_a": 2, "n_b": 2, "shared": 1, "overlap_rate": 0.5,
                                            "overlap_rate_b": 0.5, "iou": 1 / 3}


@pytest.mark.parametrize("method", ["grad", "ig"])
def test_cnl_recovers_planted_neurons(method, tmp_path, monkeypatch):
    monkeypatch.setenv("CAPLOC_CACHE", str(tmp_path / "cache"))
    model = planted_neuron_model()
    lm = wrap_model(model, byte_tokenizer(), spec="planted-neurons")
    task = PlantedTask(model, lm.tokenizer)
    layout = neuron_layout(model)
    attr = neuron_attributions(lm, task, task.items(16), method=method, steps=4)
    planted_idx = {layout.index(n) for n in PLANTED_NEURONS}
    others = [i for i in range(layout.n_total) if i not in planted_idx]
    assert np.all(attr[:, others] == 0)  # zeroed columns: no effect, exactly zero attribution
    options = CNLOptions(method=method, steps=4, top_q=0.02, min_share=0.5, general=None)
    store = EvalOptions(store=EvalStore(tmp_path / "s.sqlite"))
    report = neurons(lm, TaskSpec(task, n=16), options, evaluation=store, out=tmp_path / "run")
    found = set(report["neurons"])
    assert found and found <= {str(n) for n in PLANTED_NEURONS}
    assert report["overlap"]["overlap_rate"] >= 0.5
    located = report["ablation"]["task"]
    assert located["located"]["drop"] > 0 and located["random"]["drop"] == 0  # random neurons are inert
    assert (tmp_path / "run" / "neurons.json").exists()
    assert [e["factor"] for e in report["enhancement"]] == [1.1, 1.3, 2.0]
    assert all(e["metrics"]["logprob"]["drop"] != 0 for e in report["enhancement"])
    # a second run reads the attributions back from the cache and the evaluations from the store
    again = neurons(lm, TaskSpec(task, n=16), options, evaluation=store)
    assert again["neurons"] == report["neurons"]


def test_cnl_rejects_generation_tasks():
    lm = wrap_model(build("llama"), byte_tokenizer())
    from caploc.tasks import get_task

    with pytest.raises(CaplocError, match="known answer"):
        neuron_attributions(lm, get_task("rhyme"), get_task("rhyme").items(2))
