"""`caploc eval` and `caploc heads`: a task's scores at baseline and with heads ablated; the model's heads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from caploc.errors import require
from caploc.evaluator import Evaluator
from caploc.experiments.context import TaskOptions, resolve_model, resolve_task
from caploc.experiments.results import EvaluateResult, HeadsResult
from caploc.models import DEFAULT_MODEL, LoadedModel
from caploc.stats import low_baseline_warning, score_summary
from caploc.tasks import get_task
from caploc.tasks.base import Task


def evaluate(model: str | LoadedModel = DEFAULT_MODEL, task: str | Task = "arithmetic", n: int = 100, seed: int = 0,
             ablate: str | list[str] | None = None, *, subtask: str | None = None, shots: int | None = None,
             data: str | None = None, fewshot_data: str | None = None, chat: bool | None = None,
             allow_code_execution: bool | None = None, dtype: str = "auto", device: str = "auto",
             workers: int | None = None, ray_address: str | None = None, mode: str = "zero",
             max_new_tokens: int | None = None, progress: bool = False,
             json_path: str | Path | None = None) -> EvaluateResult:
    """Baseline and ablated scores of a task, with bootstrap 95% intervals and the paired relative drop."""
    lm = resolve_model(model, dtype, device, workers, ray_address)
    task_obj = resolve_task(task, TaskOptions(subtask, shots, data, fewshot_data, chat, allow_code_execution))
    heads = lm.layout.parse_list(ablate)
    items = task_obj.items(n, seed)
    masks = [[]] + ([[lm.layout.index(h) for h in heads]] if heads else [])
    with Evaluator(lm, task_obj, items, mode=mode, progress=progress, max_new_tokens=max_new_tokens) as evaluator:
        scores = evaluator.evaluate(masks).scores
    result = EvaluateResult(
        model=lm.describe(), task=task_obj.config(), n=len(items), seed=seed, mode=mode,
        ablated_heads=[str(h) for h in heads], metric=task_obj.default_metric,
        metrics={name: score_summary(values[0], values[1] if heads else None, seed) for name, values in scores.items()},
        budget=evaluator.stats.as_dict(), task_fingerprint=evaluator.task_fingerprint)
    if "acc" in scores:
        note = low_baseline_warning(task_obj.name, float(scores["acc"][0].mean()), task_obj.identification_metric)
        result.warnings += [note] if note else []
    if json_path:
        result.save(json_path)
    return result


def heads(model: str | LoadedModel = DEFAULT_MODEL, dtype: str = "auto", device: str = "auto", scores: str | None = None,
          seed: int = 0) -> HeadsResult:
    """The model's layers, heads and KV groups; with `scores="induction"` also each head's scores for the two
    halves of the induction circuit (`induction_scores`): prefix-matching and previous-token attention; with
    `scores="ioi"` its attention from the last token to the indirect object and to the subject (`ioi_scores`)."""
    require(scores in (None, *HEAD_SCORES), f"unknown {{scores}} {scores!r}: choose {', '.join(HEAD_SCORES)}",
            "scores")
    lm = resolve_model(model, dtype, device)
    layout = lm.layout
    rows = [{"head": str(h), "layer": h.layer, "index": layout.index(h), "kv_group": layout.kv_group(h)}
            for h in layout.all_heads()]
    if scores:
        for name, values in HEAD_SCORES[scores](lm, seed=seed).items():
            for row, value in zip(rows, values.reshape(-1)):
                row[name] = float(value)
    return HeadsResult(model=lm.describe(), heads=rows)


def prefix_matching_scores(lm: LoadedModel, n: int = 8, length: int = 40, seed: int = 0) -> np.ndarray:
    """Per head, [n_layers, n_heads]: Olsson et al. 2022's prefix-matching score (`induction_scores`)."""
    return induction_scores(lm, n, length, seed)["prefix_matching"]


def induction_scores(lm: LoadedModel, n: int = 8, length: int = 40, seed: int = 0) -> dict[str, np.ndarray]:
    """Per head, [n_layers, n_heads], on random token sequences repeated twice (one forward pass), the two
    attention signatures of the induction circuit (Olsson et al. 2022), independent of ablation:
    `prefix_matching` - the mean attention from each token of the repeat to the token that followed its first
    occurrence (induction heads score near 1); `previous_token` - the mean attention from each token to the
    one before it (the heads whose output induction heads' keys read)."""
    tok = lm.tokenizer
    model = lm.model
    special = set(tok.all_special_ids)
    ordinary = torch.tensor([i for i in range(min(len(tok), model.config.vocab_size)) if i not in special])
    g = torch.Generator().manual_seed(seed)
    first = ordinary[torch.randint(0, len(ordinary), (n, length), generator=g)]
    ids = torch.cat([first, first], dim=1)
    offset = 0
    if tok.bos_token_id is not None:
        ids = torch.cat([torch.full((n, 1), tok.bos_token_id), ids], dim=1)
        offset = 1
    return attention_signatures(_attention_weights(model, [ids])[0], length, offset)


def _attention_weights(model, batches: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Per batch of token ids, the per-layer attention weights [batch, heads, T, T] (fp32, on the CPU)."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")  # the fused kernels do not return attention weights
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            return [[a.float().cpu() for a in model(input_ids=ids.to(device), output_attentions=True).attentions]
                    for ids in batches]
    finally:
        model.set_attn_implementation(previous)


def ioi_scores(lm: LoadedModel, n: int = 40, seed: int = 0) -> dict[str, np.ndarray]:
    """Per head, [n_layers, n_heads], on `ioi` prompts (seeded, one forward pass each), the attention from the
    last token (where the name is predicted) to the indirect object's name (`name_mover`: Wang et al. 2022's
    name-mover heads attend there and copy it) and to the subject's first mention (`subject`)."""
    tok = lm.tokenizer
    items = get_task("ioi").items(n, seed)
    batches, positions = [], []
    for item in items:
        context = item.context
        ids = tok(context, return_tensors="pt")["input_ids"]

        def position(name: str) -> int:  # the token that ends the name's first mention (the prompt's prefix)
            end = context.index(name) + len(name)
            return len(tok(context[:end])["input_ids"]) - 1

        batches.append(ids)
        positions.append((position(item.meta["indirect_object"]), position(item.meta["subject"])))
    weights = _attention_weights(lm.model, batches)
    out = {}
    for key, which in (("name_mover", 0), ("subject", 1)):
        out[key] = np.stack([np.mean([layers[layer][0, :, -1, pos[which]].numpy()
                                      for layers, pos in zip(weights, positions)], axis=0)
                             for layer in range(len(weights[0]))])
    return out


def attention_signatures(attentions: list[torch.Tensor], length: int, offset: int) -> dict[str, np.ndarray]:
    """From per-layer attention weights [batch, heads, T, T] over `offset` leading tokens and a sequence of
    `length` tokens repeated twice: the prefix-matching and previous-token scores of every head."""
    queries = torch.arange(offset + length + 1, offset + 2 * length)  # second occurrence, after its first token
    keys = queries - length + 1  # the token after the query token's first occurrence
    # previous token, from the second token of the sequence on (the first has only what precedes the sequence)
    later = torch.arange(offset + 1, offset + 2 * length)
    return {"prefix_matching": np.stack([a[:, :, queries, keys].mean(dim=(0, 2)).numpy() for a in attentions]),
            "previous_token": np.stack([a[:, :, later, later - 1].mean(dim=(0, 2)).numpy() for a in attentions])}


# `heads --scores`: attention signatures of the heads the literature finds for a task, independent of ablation
HEAD_SCORES = {"induction": induction_scores, "ioi": ioi_scores}
