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
    not given. Weights are edited in a copy: a LoadedModel passed in is left untouched."""
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
    edited = _copy(lm.model)
    with torch.no_grad():
        arch.zero_head_weights(edited, heads, lm.layout)
    for attr in ("hf_quantizer",):  # a model loaded from GGUF must save as plain weights
        if getattr(edited, attr, None) is not None:
            setattr(edited, attr, None)
    if hasattr(edited.config, "quantization_config"):
        del edited.config.quantization_config
    target.mkdir(parents=True, exist_ok=True)
    edited.save_pretrained(target, safe_serialization=True)
    lm.tokenizer.save_pretrained(target)
    provenance = {"source_model": lm.describe(), "removed_heads": [str(h) for h in heads],
                  "edit": "output-projection input columns of each head set to zero (o_proj / c_proj / dense)",
                  "from_run": run["_path"] if run else None}
    (target / PROVENANCE).write_text(json.dumps(provenance, indent=2))
    return {"out": str(target), "removed_heads": provenance["removed_heads"], "model": lm.describe()}


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model)
