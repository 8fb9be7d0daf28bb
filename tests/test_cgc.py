"""Capability-guided compression: batched SAEs, density measures, Wanda, budget allocation, and compress."""

import numpy as np
import pytest
import torch

from caploc import CaplocError, EvalOptions, SAEOptions, TaskSuite, arch, wrap_model
from caploc.experiments.density import (BatchedSAE, _apportion, allocate, compress, density, density_from_features, head_outputs,
                        train_sae, wanda_per_head)
from caploc.store import EvalStore
from caploc.tasks.text import TextPerplexity, split_stream
from tiny import build, byte_tokenizer


def _sparse_data(n=2048, comps=3, d=8, atoms=16, seed=0):
    """Each component's data is a sparse combination of its own dictionary atoms."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(comps, atoms, d, generator=g)
    codes = torch.rand(n, comps, atoms, generator=g) * (torch.rand(n, comps, atoms, generator=g) < 0.15)
    return torch.einsum("nca,cad->ncd", codes, dictionary)


def test_sae_training_reduces_reconstruction_error():
    x = _sparse_data()
    sae, training = train_sae(x, n_features=32, l1=1e-3, steps=150, seed=0)
    first, last = training["history"][0], training["final"]
    assert last["mse"] < 0.3 * first["mse"]
    # the untrained model is worse than the trained one on the same data
    untrained = BatchedSAE(3, 8, 32, seed=0)
    with torch.no_grad():
        assert untrained.loss(x, 0.0)[1]["mse"] > last["mse"]


def test_sae_sparsity_penalty_works():
    x = _sparse_data()
    _, weak = train_sae(x, n_features=32, l1=1e-4, steps=150, seed=0)
    _, strong = train_sae(x, n_features=32, l1=3e-1, steps=150, seed=0)
    assert strong["final"]["l0"] < 0.8 * weak["final"]["l0"]
    assert strong["final"]["mse"] > weak["final"]["mse"]


def test_density_measures_on_constructed_features():
    window, n_feat = 4, 8
    f = torch.zeros(16, 3, n_feat)
    f[:, 0, :] = 1.0  # component 0: every feature, evenly, on every token: maximally dense
    f[:, 1, 0] = 5.0  # component 1: a single feature: no breadth, no entropy
    f[:8, 2, :4] = 1.0  # component 2: half the features on the first two windows, the others on the rest
    f[8:, 2, 4:] = 1.0
    m = density_from_features(f, window)
    assert m["density"][0] == pytest.approx(1.0)
    assert m["breadth"][1] == pytest.approx(1 / n_feat) and m["entropy"][1] == pytest.approx(0.0)
    assert m["breadth"][2] == 1.0 and m["entropy"][2] == pytest.approx(1.0)
    assert m["consistency"][2] == pytest.approx(1 / 3, abs=1e-6)  # 2 of the 6 window pairs agree
    assert m["density"][0] > m["density"][2] > m["density"][1]


def test_wanda_matches_a_direct_computation():
    lm = wrap_model(build("llama"), byte_tokenizer())
    windows = torch.randint(0, 256, (2, 16))
    outputs = head_outputs(lm, windows)
    assert outputs.shape == (32, lm.layout.n_total, lm.layout.head_dim)
    scores = wanda_per_head(lm, outputs)
    layer, head, d = 1, 2, lm.layout.head_dim
    w = arch.attn_out_projs(lm.model)[layer].weight.detach()
    x = outputs[:, layer * lm.layout.n_heads + head, :]
    expected = sum(float(w[i, head * d + j].abs() * x[:, j].norm()) for i in range(w.shape[0]) for j in range(d))
    assert scores[layer * lm.layout.n_heads + head] == pytest.approx(expected, rel=1e-4)


def test_allocation_rules():
    budgets = _apportion(np.array([1.0, 1.0, 2.0]), 8, 3)
    assert sum(budgets) == 8 and max(budgets) == 3 and budgets[2] == 3  # capped, sums to the total
    assert sum(_apportion(np.array([0.1, 5.0, 0.1]), 5, 4)) == 5
    n_layers, n_heads = 4, 4
    wanda = np.arange(16, dtype=float)[::-1].copy()  # head 15 least important
    dens = np.repeat([0.9, 0.1, 0.5, 0.5], 4)  # layer 0 dense, layer 1 sparse
    by_density = allocate("density", 0.25, dens, wanda, n_layers, n_heads)
    per_layer = np.bincount([i // 4 for i in by_density], minlength=4)
    assert len(by_density) == 4 and per_layer[1] > per_layer[0]  # denser layers lose fewer heads
    assert allocate("uniform", 0.25, dens, wanda, n_layers, n_heads) == [3, 7, 11, 15]
    assert allocate("wanda", 0.25, dens, wanda, n_layers, n_heads) == [12, 13, 14, 15]
    with pytest.raises(CaplocError, match="allocation"):
        allocate("random", 0.25, dens, wanda, n_layers, n_heads)


def test_text_stream_split_is_disjoint():
    train, held_out = split_stream()
    assert len(train) > 300_000 and len(held_out) > 50_000
    task = TextPerplexity()
    chunks = [i.context + i.target for i in task.items(20)]
    assert all(c in held_out for c in chunks)


def test_density_and_compress_on_a_tiny_model(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPLOC_CACHE", str(tmp_path / "cache"))
    lm = wrap_model(build("llama"), byte_tokenizer(), spec="tiny")
    sae = SAEOptions(n_tokens=512, window=64, steps=40)
    report = density(lm, sae, out=tmp_path)
    assert len(report["density"]) == len(report["wanda"]) == lm.layout.n_total
    assert all(0 <= v <= 1 for v in report["density"]) and all(v > 0 for v in report["wanda"])
    assert -1 <= report["spearman_density_wanda"] <= 1
    again = density(lm, sae)  # from the cache
    assert again["density"] == report["density"]
    result = compress(lm, 0.25, suite=TaskSuite("general", n=4), sae=sae,
                      evaluation=EvalOptions(store=EvalStore(tmp_path / "s.sqlite")), out=tmp_path)
    rows = {r["allocation"]: r for r in result["rows"]}
    assert set(rows) == {"none", "density", "uniform", "wanda"}
    assert all(rows[a]["removed"] == 3 for a in ("density", "uniform", "wanda"))
    assert rows["none"]["perplexity"] > 1 and all(np.isfinite(r["perplexity"]) for r in rows.values())
    assert (tmp_path / "compress.json").exists() and (tmp_path / "density.json").exists()
