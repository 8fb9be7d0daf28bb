"""Capability-guided compression (CGC): per-head capability density from sparse autoencoders, Wanda importance,
and compression budgets allocated from them.

Token stream: CPython's documentation topics (`caploc.tasks.text`), training share only; `n_tokens` tokens
in windows of `window` tokens. For every head, its output (the head's slice of the attention output
projection's input, d = head_dim) is normalized to unit mean norm and fed to its own SAE: all heads of the
model train at once as one batched SAE (weights [n_heads_total, d, F], F = expansion x d):

    f = ReLU((x - b_dec) W_enc + b_enc),  x_hat = f W_dec + b_dec,
    loss = mean ||x - x_hat||^2 + l1 * mean sum_j f_j ||W_dec[j]||        (Adam, seeded)

Capability density of a head, from its SAE features f on held-out windows of the same stream:
- breadth B = share of the F features that fire (f > 0) on at least one token;
- entropy H = Shannon entropy of the features' share of total activation mass, divided by log F;
- consistency C = mean cosine similarity, over all pairs of windows, of the windows' feature firing-rate
  vectors (how much the same features fire whatever the input);
- density = (B * H * C) ** (1/3), in [0, 1]: broad, evenly used and input-independent features = dense.
The source names these ingredients without a formula; this combination is ours, geometric so that a head
scoring zero on any one of them is not dense.

Wanda importance of a head (Sun et al. 2023): sum over its output-projection columns j and all rows i of
|W_ij| * ||X_j||_2, X_j = column j of the projection's input over every token of the stream.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dataclasses import asdict, dataclass, field

from caploc.errors import CaplocError, require
from caploc.experiments.results import CompressResult, DensityResult, LocateResult
from caploc.experiments.specs import EvalOptions, ModelSpec, Runtime, TaskSuite, cli
from caploc.files import HashCache
from caploc.models import DEFAULT_MODEL, LoadedModel
from caploc.sites import head_site
from caploc.tasks.base import LoglikelihoodTask, TargetTask
from caploc.tasks.text import TextPerplexity, split_stream

ALLOCATIONS = ("density", "uniform", "wanda")


class BatchedSAE(nn.Module):
    """One sparse autoencoder per component, trained together: inputs [batch, n_components, d]."""

    def __init__(self, n_components: int, d: int, n_features: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(n_components, d, n_features, generator=g) / d ** 0.5
        self.W_enc = nn.Parameter(w.clone())
        self.W_dec = nn.Parameter(w.transpose(1, 2).clone())  # tied init, trained apart
        self.b_enc = nn.Parameter(torch.zeros(n_components, n_features))
        self.b_dec = nn.Parameter(torch.zeros(n_components, d))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(torch.einsum("bcd,cdf->bcf", x - self.b_dec, self.W_enc) + self.b_enc)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encode(x)
        return torch.einsum("bcf,cfd->bcd", f, self.W_dec) + self.b_dec, f

    def loss(self, x: torch.Tensor, l1: float) -> tuple[torch.Tensor, dict]:
        x_hat, f = self(x)
        mse = ((x - x_hat) ** 2).sum(-1).mean()
        sparsity = (f * self.W_dec.norm(dim=-1)[None]).sum(-1).mean()
        return mse + l1 * sparsity, {"mse": float(mse.detach()), "l0": float((f > 0).float().sum(-1).mean())}


def train_sae(x: torch.Tensor, n_features: int, l1: float = 1e-3, steps: int = 300, batch: int = 256,
              lr: float = 3e-3, seed: int = 0) -> tuple[BatchedSAE, dict]:
    """x: [tokens, n_components, d]. Returns the SAE and its training curve (first/last loss terms)."""
    torch.manual_seed(seed)
    sae = BatchedSAE(x.shape[1], x.shape[2], n_features, seed)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    history = []
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (min(batch, x.shape[0]),), generator=g)
        loss, stats = sae.loss(x[idx], l1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 0 or step == steps - 1 or step % 50 == 0:
            history.append({"step": step, "loss": loss.item(), **stats})
    with torch.no_grad():
        _, stats = sae.loss(x, l1)
    return sae, {"history": history, "final": stats}


def _stream_ids(lm: LoadedModel, n_tokens: int, window: int, part: str) -> torch.Tensor:
    train, held_out = split_stream()
    text = train if part == "train" else held_out
    ids = lm.tokenizer(text[: n_tokens * 8], add_special_tokens=False)["input_ids"]
    usable = (min(len(ids), n_tokens) // window) * window
    if usable < window:
        raise CaplocError("the offline text stream is too short for one window")
    return torch.tensor(ids[:usable]).view(-1, window)


@torch.no_grad()
def head_outputs(lm: LoadedModel, windows: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """[tokens, n_heads_total, head_dim]: every head's output (its slice of the output projection's input)."""
    site = head_site(lm.model)
    captured: list[list[torch.Tensor]] = [[] for _ in range(site.n_layers)]

    def capture(layer: int, units: torch.Tensor) -> None:
        captured[layer].append(units.detach().float().reshape(-1, site.n_units, site.unit_dim))

    device = next(lm.model.parameters()).device
    with site.hooked(capture):
        for start in range(0, windows.shape[0], batch):
            lm.model(input_ids=windows[start:start + batch].to(device), logits_to_keep=1)
    return torch.cat([torch.cat(c).cpu() for c in captured], dim=1)  # [tokens, layers*heads, d]


def density_from_features(f: torch.Tensor, window: int) -> dict[str, np.ndarray]:
    """f: [tokens, n_components, F] feature activations on held-out windows -> breadth, entropy,
    consistency and density per component."""
    n_tokens, n_comp, n_feat = f.shape
    fires = f > 0
    breadth = fires.any(0).float().mean(-1)
    mass = f.sum(0)  # [components, F]
    p = mass / mass.sum(-1, keepdim=True).clamp_min(1e-12)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(-1) / np.log(n_feat)
    rates = fires.view(n_tokens // window, window, n_comp, n_feat).float().mean(1)  # [windows, comp, F]
    unit = rates / rates.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    n_win = unit.shape[0]
    gram = torch.einsum("wcf,vcf->cwv", unit, unit)
    off_diagonal = (gram.sum((1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(-1)) / max(1, n_win * (n_win - 1))
    density = (breadth * entropy * off_diagonal).clamp_min(0) ** (1 / 3)
    return {"breadth": breadth.numpy(), "entropy": entropy.numpy(), "consistency": off_diagonal.numpy(),
            "density": density.numpy()}


@torch.no_grad()
def wanda_per_head(lm: LoadedModel, outputs: torch.Tensor) -> np.ndarray:
    """sum_{i, j in head} |W_ij| * ||X_j||_2 with X the output projection's input over the stream."""
    site = head_site(lm.model)
    norms = outputs.norm(dim=0).view(site.n_layers, site.n_units, site.unit_dim)  # [layers, heads, d]
    col_abs = torch.stack([site.columns(layer).detach().float().abs().sum(0) for layer in range(site.n_layers)])
    return (col_abs.cpu() * norms.cpu()).sum(-1).reshape(-1).numpy()  # the weights may sit on an accelerator


def _spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


@dataclass(frozen=True)
class SAEOptions:
    """The sparse autoencoders behind capability density: tokens of the text stream, window length, features
    per head, sparsity penalty, training steps, seed."""

    n_tokens: int = field(default=8192, metadata=cli("--tokens", help="SAE training tokens from the offline text "
                                                                      "stream"))
    window: int = 128
    expansion: int = field(default=4, metadata=cli("--expansion", help="SAE features per head = expansion x "
                                                                       "head_dim"))
    l1: float = field(default=0.1, metadata=cli("--l1", help="SAE sparsity penalty (on unit-mean-norm head outputs)"))
    steps: int = field(default=300, metadata=cli("--steps", help="SAE training steps"))
    seed: int = field(default=0, metadata=cli("--seed", help="seed of the SAEs' initialisation and batches"))


def density(model: ModelSpec | str | LoadedModel = DEFAULT_MODEL, sae: SAEOptions | None = None, *,
            from_run: str | Path | None = None, out: str | Path | None = None) -> DensityResult:
    """Capability density and Wanda importance for every head, and their Spearman correlations (with the
    head scores of a locate run too, when `from_run` is given). Cached per model and parameters."""
    started = time.perf_counter()
    lm = Runtime.open(model, store=False).lm
    sae = sae or SAEOptions()
    params = asdict(sae)

    def compute() -> dict:
        train_out = head_outputs(lm, _stream_ids(lm, sae.n_tokens, sae.window, "train"))
        eval_out = head_outputs(lm, _stream_ids(lm, max(sae.window * 4, sae.n_tokens // 8), sae.window, "held_out"))
        scale = train_out.norm(dim=-1).mean(0).clamp_min(1e-6)[None, :, None]  # unit mean norm per head
        autoencoder, training = train_sae(train_out / scale, sae.expansion * lm.layout.head_dim, sae.l1, sae.steps,
                                          seed=sae.seed)
        with torch.no_grad():
            features = autoencoder.encode(eval_out / scale)
        measures = density_from_features(features, sae.window)
        wanda = wanda_per_head(lm, torch.cat([train_out, eval_out]))
        return {"params": params, "training": training, "heads": [str(h) for h in lm.layout.all_heads()],
                **{k: v.tolist() for k, v in measures.items()}, "wanda": wanda.tolist()}

    result = HashCache("density", ".json").get_or_compute({"model": lm.fingerprint, **params}, compute)
    report = DensityResult(
        model=lm.describe(), **result,
        text="pydoc_data.topics (CPython documentation), training share for the SAE, held-out for the density "
             "measures",
        spearman_density_wanda=_spearman(result["density"], result["wanda"]))
    if from_run:
        run = LocateResult.load(from_run)
        report.from_run = str(run.path)
        report.spearman_density_head_scores = _spearman(result["density"], run.head_scores)
    report.wall_seconds = round(time.perf_counter() - started, 2)
    if out:
        report.save(out)
    return report


def allocate(allocation: str, target: float, density_scores: np.ndarray, wanda: np.ndarray, n_layers: int,
             n_heads: int) -> list[int]:
    """Flat indices of the heads to remove: `target` of all heads.
    - wanda: the globally least important heads by Wanda;
    - uniform: the same number from every layer (least Wanda within the layer);
    - density: per-layer budgets inversely related to the layer's mean density (denser layers lose fewer
      heads), least Wanda within the layer."""
    require(allocation in ALLOCATIONS,
            f"unknown {{allocation}} {allocation!r}: choose one of {', '.join(ALLOCATIONS)}", "allocation")
    require(0 < target < 1, "{target} must be a fraction of heads in (0, 1)", "target")
    total = int(round(target * n_layers * n_heads))
    wanda_grid = wanda.reshape(n_layers, n_heads)
    if allocation == "wanda":
        return sorted(int(i) for i in np.argsort(wanda)[:total])
    if allocation == "uniform":
        weights = np.ones(n_layers)
    else:
        layer_density = density_scores.reshape(n_layers, n_heads).mean(1)
        spread = layer_density.max() - layer_density.min()
        weights = 1 - (layer_density - layer_density.min()) / spread if spread > 0 else np.ones(n_layers)
        weights = weights + 1e-3  # every layer can give something
    budgets = _apportion(weights, total, n_heads)
    removed = []
    for layer, budget in enumerate(budgets):
        order = np.argsort(wanda_grid[layer])[:budget]
        removed += [layer * n_heads + int(h) for h in order]
    return sorted(removed)


def _apportion(weights: np.ndarray, total: int, cap: int) -> list[int]:
    """Integer budgets proportional to weights, summing to total, none above cap (largest remainders)."""
    budgets = np.zeros(len(weights), dtype=int)
    remaining = total
    active = np.ones(len(weights), dtype=bool)
    while remaining > 0 and active.any():
        share = weights * active
        ideal = share / share.sum() * remaining
        add = np.minimum(np.floor(ideal).astype(int), cap - budgets)
        if add.sum() == 0:  # hand out one by one, largest remainder first
            for i in np.argsort(-(ideal - np.floor(ideal))):
                if active[i] and budgets[i] < cap and remaining > 0:
                    budgets[i] += 1
                    remaining -= 1
        else:
            budgets += add
            remaining -= int(add.sum())
        active = budgets < cap
    return budgets.tolist()


def compress(model: ModelSpec | str | LoadedModel = DEFAULT_MODEL, target: float = 0.3,
             allocation: str | list[str] = ("density", "uniform", "wanda"), suite: TaskSuite | None = None,
             sae: SAEOptions | None = None, *, evaluation: EvalOptions | None = None,
             out: str | Path | None = None) -> CompressResult:
    """Remove `target` of the heads under each allocation; report held-out perplexity and the suite's task
    scores (`suite.n` items, and as many text chunks)."""
    started = time.perf_counter()
    suite = suite or TaskSuite("arithmetic,general", n=50)
    allocations = [allocation] if isinstance(allocation, str) else list(allocation)
    for a in allocations:  # refuse bad arguments before the model and the SAEs cost anything
        allocate(a, target, np.zeros(1), np.zeros(1), 1, 1)
    rt = Runtime.open(model, evaluation)
    lm = rt.lm
    scores = density(lm, sae)
    d, w = np.asarray(scores.density), np.asarray(scores.wanda)
    layout = lm.layout
    removed = {a: allocate(a, target, d, w, layout.n_layers, layout.n_heads) for a in allocations}
    masks = [[]] + [removed[a] for a in allocations]
    text = TextPerplexity(chunk_chars=600)  # longer chunks than the control task's: perplexity of passages
    evaluations = {}
    for task in [text] + suite.build():
        evaluator = rt.evaluator(task, task.items(suite.n, suite.seed))
        result = evaluator.evaluate(masks)
        counts = evaluator.target_tokens() if isinstance(task, TargetTask) else None
        if task is text:
            evaluations["perplexity"] = [float(np.exp(-result.scores["logprob"][m].sum() / counts.sum()))
                                         for m in range(len(masks))]
        else:
            metric = task.default_metric
            evaluations[f"{task.name} {metric}"] = result.mean(metric).tolist()
            if isinstance(task, LoglikelihoodTask):
                evaluations[f"{task.name} logprob"] = result.mean("logprob").tolist()
    rows = [{"allocation": "none", "removed": 0, **{k: v[0] for k, v in evaluations.items()}}]
    for j, a in enumerate(allocations, 1):
        per_layer = np.bincount([i // layout.n_heads for i in removed[a]], minlength=layout.n_layers)
        rows.append({"allocation": a, "removed": len(removed[a]), "per_layer": per_layer.tolist(),
                     "heads": [str(layout.head(i)) for i in removed[a]],
                     **{k: v[j] for k, v in evaluations.items()}})
    report = CompressResult(model=lm.describe(), target=target, n=suite.n, seed=suite.seed,
                            perplexity_text=text.config(),
                            rows=rows, spearman_density_wanda=scores.spearman_density_wanda,
                            wall_seconds=round(time.perf_counter() - started, 2))
    if out:
        report.save(out)
    return report
