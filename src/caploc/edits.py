"""Turning a finding into a model edit: an HF checkpoint whose output-projection columns for the chosen heads
are zero. Plain `transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads it; caploc is not needed."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from caploc import arch
from caploc.errors import CaplocError
from caploc.models import DEFAULT_MODEL, LoadedModel
from caploc.runs import load_run, run_heads

PROVENANCE = "caploc_export.json"


def export(model: str | LoadedModel | None = None, ablate: str | list[str] | None = None, out: str | Path = "",
           *, from_run: str | Path | None = None, k: int | None = None, dtype: str = "float32") -> dict:
    """Write `out` (safetensors + config + tokenizer) with the heads' output-projection columns zeroed.
    The heads come from `ablate`, or the top-k of a locate run (`from_run`); the model is the run's when
    not given. The columns are zeroed in place only while saving and restored afterwards (no second copy of
    a large model in memory): a LoadedModel passed in ends up unchanged."""
    from caploc.api import resolve_model

    if not out:
        raise CaplocError("export needs --out DIR")
    run = load_run(from_run) if from_run else None
    if run is None and not ablate:
        raise CaplocError("give the heads to remove (--ablate L3H2,L5H1) or a locate run (--from runs/NAME)")
    if run is not None:
        model = model or run["model"]["spec"]
        ablate = ablate or run_heads(run, k)
    target = Path(out)
    if target.exists() and any(target.iterdir()):
        raise CaplocError(f"{target} exists and is not empty: choose a new directory")
    lm = resolve_model(model or DEFAULT_MODEL, dtype)
    heads = lm.layout.parse_list(ablate)
    if not heads:
        raise CaplocError("no heads to remove")
    model = lm.model
    projs = arch.attn_out_projs(model)
    saved = {layer: projs[layer].weight.detach().clone() for layer in sorted({h.layer for h in heads})}
    target.mkdir(parents=True, exist_ok=True)
    try:
        with torch.no_grad():
            arch.zero_head_weights(model, heads, lm.layout)
        if getattr(model, "hf_quantizer", None) is not None:  # a model loaded from GGUF saves as plain weights
            model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(target, safe_serialization=True)
    finally:
        with torch.no_grad():
            for layer, weight in saved.items():
                projs[layer].weight.copy_(weight)
    lm.tokenizer.save_pretrained(target)
    provenance = {"source_model": lm.describe(), "removed_heads": [str(h) for h in heads],
                  "edit": "output-projection input columns of each head set to zero (o_proj / c_proj / dense)",
                  "from_run": run["_path"] if run else None}
    (target / PROVENANCE).write_text(json.dumps(provenance, indent=2))
    return {"out": str(target), "removed_heads": provenance["removed_heads"], "model": lm.describe()}

