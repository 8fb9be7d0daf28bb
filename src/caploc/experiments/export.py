"""Turning a finding into a model edit: an HF checkpoint whose output-projection columns for the chosen heads
are zero. Plain `transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads it; caploc is not needed."""

from __future__ import annotations

from pathlib import Path

from caploc.errors import ParameterError, require
from caploc.experiments.results import ExportResult, LocateResult
from caploc.experiments.specs import ModelSpec, Runtime
from caploc.files import write_json
from caploc.models import LoadedModel
from caploc.sites import head_site

PROVENANCE = "caploc_export.json"


def export(model: ModelSpec | str | LoadedModel | None = None, ablate: str | list[str] | None = None,
           out: str | Path = "", *, from_run: str | Path | None = None, k: int | None = None) -> ExportResult:
    """Write `out` (safetensors + config + tokenizer) with the heads' output-projection columns zeroed.
    The heads come from `ablate`, or the top-k of a locate run (`from_run`); the model is the run's when
    not given. The columns are zeroed in place only while saving and restored afterwards (no second copy of
    a large model in memory): a LoadedModel passed in ends up unchanged."""
    require(bool(out), "export needs {out} (a new directory)", "out")
    run = LocateResult.load(from_run) if from_run else None
    if run is None and not ablate:
        raise ParameterError("give the heads to remove ({ablate}, e.g. L3H2,L5H1) or a locate run ({from_run})",
                             "ablate", "from_run")
    spec = ModelSpec.of(model)
    if run is not None:
        spec = spec.with_run_defaults(run.model)
        ablate = ablate or run.top_heads(k)
    target = Path(out)
    require(not (target.exists() and any(target.iterdir())),
            f"{target} exists and is not empty: choose a new directory for {{out}}", "out")
    lm = Runtime.open(spec, store=False).lm
    heads = lm.layout.parse_list(ablate)
    require(bool(heads), "no heads to remove ({ablate})", "ablate")
    model = lm.model
    site = head_site(model)
    saved = site.saved_columns(heads)
    target.mkdir(parents=True, exist_ok=True)
    try:
        site.zero_columns(heads)
        if getattr(model, "hf_quantizer", None) is not None:  # a model loaded from GGUF saves as plain weights
            model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(target, safe_serialization=True)
    finally:
        site.restore(saved)
    lm.tokenizer.save_pretrained(target)
    provenance = {"source_model": lm.describe(), "removed_heads": [str(h) for h in heads],
                  "edit": "output-projection input columns of each head set to zero (o_proj / c_proj / dense)",
                  "from_run": str(run.path) if run else None}
    write_json(target / PROVENANCE, provenance)
    return ExportResult(out=str(target), removed_heads=provenance["removed_heads"], model=lm.describe())
