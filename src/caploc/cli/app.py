"""The `caploc` commands: each parses its options, calls its API function, and renders the typed result."""

from __future__ import annotations

from typing import Optional

import typer

from caploc import api
from caploc.cli import options as o
from caploc.cli import render
from caploc.experiments.locate import CONTROL_DEFAULT, DEFAULT_BOOTSTRAP
from caploc.methods import (DEFAULT_EXCHANGE, DEFAULT_MASKS, DEFAULT_METHOD, DEFAULT_PENALTY, DEFAULT_SCREEN,
                            DEFAULT_SPARSITY, DEFAULT_SWAPS, DEFAULT_TOLERANCE, METHODS)
from caploc.methods.exchange import CONFIDENCE
from caploc.models import DEFAULT_MODEL

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Find which components of a transformer carry a capability, and prove it by ablation.")


def _progress(quiet: bool, as_json: bool) -> bool:
    return not (quiet or as_json)


@app.command()
def eval(  # noqa: A001 - the command is called eval
    model: o.Model = DEFAULT_MODEL, task: o.Task = "arithmetic", n: o.N = 100, seed: o.Seed = 0,
    ablate: Optional[str] = typer.Option(None, "--ablate", help="heads to ablate, e.g. L3H2,L5H1 (L0 = all of layer 0)"),
    subtask: o.Subtask = None, shots: o.Shots = None, data: o.Data = None, fewshot_data: o.FewshotData = None,
    chat: o.Chat = None, dtype: o.Dtype = "auto", device: o.Device = "auto", workers: o.Workers = None, ray_address: o.RayAddress = None, mode: o.Mode = "zero", max_new_tokens: o.MaxNewTokens = None,
    allow_code_execution: o.CodeExecution = None, as_json: o.AsJson = False, json_file: o.JsonFile = None,
    quiet: o.Quiet = False,
):
    """Score a task at baseline and with heads ablated: bootstrap 95% intervals and the relative drop."""
    result = api.evaluate(model, task, n, seed, ablate, subtask=subtask, shots=shots, data=data,
                          fewshot_data=fewshot_data, chat=chat, allow_code_execution=allow_code_execution,
                          dtype=dtype, device=device, workers=workers, ray_address=ray_address, mode=mode, max_new_tokens=max_new_tokens, progress=_progress(quiet, as_json))
    render.emit(result, as_json, json_file, render.print_eval)


@app.command()
def locate(
    model: o.Model = DEFAULT_MODEL, task: o.Task = "arithmetic",
    method: str = typer.Option(DEFAULT_METHOD, "--method", help=f"{', '.join(METHODS)} (default {DEFAULT_METHOD}: "
                               "a screen nominates candidates, exact greedy picks among them)"),
    k: int = typer.Option(5, "--k", help="number of heads to report and validate"),
    n: o.N = 100, seed: o.Seed = 0,
    control: str = typer.Option(CONTROL_DEFAULT, "--control", help="control task(s) evaluated on every mask; heads "
                                "are chosen by the share of the target removed minus --penalty x the controls' "
                                "damage ('text': prose language modelling); 'none' for the paper's plain objective"),
    n_control: Optional[int] = typer.Option(None, "--n-control",
                                            help="control identification items (default: min(--n, 24))"),
    penalty: float = typer.Option(DEFAULT_PENALTY, "--penalty", help="weight of the controls' damage (relative drop)"),
    tolerance: Optional[float] = typer.Option(DEFAULT_TOLERANCE, "--control-tolerance",
                                              help="optional: the control's relative drop a head set may cost "
                                                   "before it ranks below every set within it (use with a large "
                                                   "--n-control)"),
    screen: str = typer.Option(DEFAULT_SCREEN, "--screen", help="refine: the screen (atp, csb, css)"),
    n_candidates: Optional[int] = typer.Option(None, "--candidates", help="refine: candidates greedy decides among "
                                               "(default 8 with the atp screen, re-taken every round; 16 with "
                                               "csb or css)"),
    exchange: int = typer.Option(DEFAULT_EXCHANGE, "--exchange", help="refine: passes of exact head swaps after its "
                                 f"greedy ({DEFAULT_SWAPS} proposed swaps each; a swap is kept only if it raises the "
                                 f"criterion in {CONFIDENCE:.0%} of bootstrap resamples of the items; 0 for none)"),
    bootstrap: int = typer.Option(DEFAULT_BOOTSTRAP, "--bootstrap", help="item resamples for selection frequencies "
                                  "(no new model calls; 0 to skip)"),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="comma-separated seeds: run each, report recurrence"),
    n_masks: o.Masks = DEFAULT_MASKS, sparsity: o.Sparsity = DEFAULT_SPARSITY,
    alpha: str = typer.Option("cv", "--alpha", help="Lasso penalty: cv (cross-validated) or a number"),
    metric: Optional[str] = typer.Option(None, "--metric", help="identification metric (default: logprob "
                                         "where the target is known, else the task score)"),
    n_validate: Optional[int] = typer.Option(None, "--n-validate", help="held-out items (default: --n)"),
    exclude: Optional[str] = typer.Option(None, "--exclude", help="heads never reported, e.g. L0H1,L1"),
    exclude_universal: Optional[str] = typer.Option(None, "--exclude-universal",
                                                    help="never report the heads a `caploc universal` result flags "
                                                         "(its --out directory or universal.json)"),
    subtask: o.Subtask = None, shots: o.Shots = None, data: o.Data = None, fewshot_data: o.FewshotData = None,
    chat: o.Chat = None, dtype: o.Dtype = "auto", device: o.Device = "auto", workers: o.Workers = None, ray_address: o.RayAddress = None, mode: o.Mode = "zero", max_new_tokens: o.MaxNewTokens = None,
    allow_code_execution: o.CodeExecution = None, store: o.Store = None,
    out: Optional[str] = typer.Option(None, "--out", help="run directory: writes OUT/result.json"),
    as_json: o.AsJson = False, json_file: o.JsonFile = None, quiet: o.Quiet = False,
):
    """Find the heads that carry a capability, then validate them on held-out items."""
    result = api.locate(model, task, method, k, n, seed, control=control, n_control=n_control, penalty=penalty, tolerance=tolerance,
                        screen=screen, n_candidates=n_candidates, exchange=exchange, bootstrap=bootstrap,
                        seeds=[int(o.parse_float(x, "seeds")) for x in seeds.split(",")] if seeds else None,
                        n_masks=n_masks, sparsity=sparsity,
                        alpha=alpha if alpha == "cv" else o.parse_float(alpha, "alpha"), metric=metric,
                        n_validate=n_validate, subtask=subtask, shots=shots, data=data, fewshot_data=fewshot_data,
                        chat=chat, allow_code_execution=allow_code_execution, dtype=dtype, device=device, workers=workers, ray_address=ray_address, mode=mode,
                        max_new_tokens=max_new_tokens, exclude=exclude, exclude_universal=exclude_universal,
                        store=store, out=out, progress=_progress(quiet, as_json))
    render.emit(result, as_json, json_file, render.print_locate)
    if out and not as_json:
        render.console.print(f"wrote {out}/result.json")


@app.command()
def heads(model: o.Model = DEFAULT_MODEL,
          scores: Optional[str] = typer.Option(None, "--scores", help="also score every head: induction (prefix-"
                                               "matching and previous-token attention on repeated random tokens) "
                                               "or ioi (attention from the last token to the indirect object and "
                                               "to the subject)"),
          seed: o.Seed = 0, dtype: o.Dtype = "auto", device: o.Device = "auto", as_json: o.AsJson = False, json_file: o.JsonFile = None):
    """List the model's layers, attention heads and their KV groups (and per-head scores)."""
    render.emit(api.heads(model, dtype, device, scores=scores, seed=seed), as_json, json_file, render.print_heads)


@app.command()
def specificity(
    model: o.RunModel = None, heads: Optional[str] = typer.Option(None, "--heads", help="heads to ablate, e.g. L3H2,L5H1"),
    from_run: o.FromRun = None, k: o.RunK = None, tasks: o.Tasks = "arithmetic,general",
    n: int = typer.Option(50, "--n", help="items per task"), seed: o.Seed = 0,
    data: o.TaskData = None, subtask: o.TaskSubtask = None, allow_code_execution: o.CodeExecution = None,
    dtype: Optional[str] = typer.Option(None, "--dtype", help="auto, float32 or bfloat16 (default: the run's, else auto)"),
    device: o.Device = "auto", workers: o.Workers = None, ray_address: o.RayAddress = None,
    mode: o.Mode = "zero", max_new_tokens: o.MaxNewTokens = None, store: o.Store = None,
    out: Optional[str] = typer.Option(None, "--out", help="directory for specificity.json (default: the --from run)"),
    as_json: o.AsJson = False, json_file: o.JsonFile = None, quiet: o.Quiet = False,
):
    """Ablate a head set on several tasks: does it break its capability and leave the others standing?"""
    result = api.specificity(model, heads, tasks, n, seed, from_run=from_run, k=k,
                             task_options=o.parse_task_options(data, subtask),
                             allow_code_execution=allow_code_execution, dtype=dtype, device=device, workers=workers, ray_address=ray_address, mode=mode,
                             max_new_tokens=max_new_tokens, store=store, out=out, progress=_progress(quiet, as_json))
    render.emit(result, as_json, json_file, render.print_specificity)


@app.command()
def universal(
    model: o.Model = DEFAULT_MODEL,
    tasks: str = typer.Option("arithmetic,general,rhyme", "--tasks", help="comma-separated tasks (at least 2 make sense)"),
    n: int = typer.Option(20, "--n", help="items per task"), seed: o.Seed = 0,
    heads: Optional[str] = typer.Option(None, "--heads", help="candidate heads to scan (default: all)"),
    threshold: float = typer.Option(0.1, "--threshold", help="relative drop that counts as degrading a task"),
    min_tasks: Optional[int] = typer.Option(None, "--min-tasks", help="tasks a universal head must degrade "
                                            "(default: all but one of >= 3 tasks, else all)"),
    top: int = typer.Option(15, "--top", help="rows to print"),
    data: o.TaskData = None, subtask: o.TaskSubtask = None, allow_code_execution: o.CodeExecution = None,
    dtype: o.Dtype = "auto", device: o.Device = "auto", workers: o.Workers = None, ray_address: o.RayAddress = None, mode: o.Mode = "zero", max_new_tokens: o.MaxNewTokens = None, store: o.Store = None,
    out: Optional[str] = typer.Option(None, "--out", help="directory: writes OUT/universal.json"),
    as_json: o.AsJson = False, json_file: o.JsonFile = None, quiet: o.Quiet = False,
):
    """Ablate every head alone on several tasks and report the heads that degrade most of them at once."""
    result = api.universal(model, tasks, n, seed, candidates=heads, threshold=threshold, min_tasks=min_tasks,
                           task_options=o.parse_task_options(data, subtask), allow_code_execution=allow_code_execution,
                           dtype=dtype, device=device, workers=workers, ray_address=ray_address, mode=mode, max_new_tokens=max_new_tokens, store=store, out=out,
                           progress=_progress(quiet, as_json))
    render.emit(result, as_json, json_file, lambda r: render.print_universal(r, top))


@app.command()
def compare(run_a: str = typer.Argument(..., help="a locate run directory"),
            run_b: str = typer.Argument(..., help="another locate run directory"),
            k: Optional[int] = typer.Option(None, "--k", help="compare the top-k (default: each run's k)"),
            as_json: o.AsJson = False, json_file: o.JsonFile = None):
    """Overlap of the heads found by two locate runs (e.g. identified on arithmetic vs on gsm8k)."""
    render.emit(api.compare(run_a, run_b, k), as_json, json_file, render.print_compare)


@app.command()
def report(run: str = typer.Argument(..., help="a locate run directory (runs/NAME)"),
           out: Optional[str] = typer.Option(None, "--out", help="where to write (default: the run directory)"),
           universal_path: Optional[str] = typer.Option(None, "--universal",
                                                        help="a `caploc universal` result to mark on the heatmap"),
           open_browser: bool = typer.Option(False, "--open", help="open the page in a browser"),
           as_json: o.AsJson = False):
    """Write report.html (images embedded) and PNG figures for a locate run."""
    render.emit(api.report(run, out=out, universal_path=universal_path, open_browser=open_browser), as_json, None,
                render.print_report)


@app.command()
def export(model: o.RunModel = None,
           ablate: Optional[str] = typer.Option(None, "--ablate", help="heads to remove, e.g. L3H2,L5H1"),
           from_run: Optional[str] = typer.Option(None, "--from", help="remove the top-k heads of a locate run"),
           k: o.RunK = None, out: str = typer.Option(..., "--out", help="new directory for the HF checkpoint"),
           dtype: o.Dtype = "auto", device: o.Device = "auto", as_json: o.AsJson = False):
    """Save an HF checkpoint with the heads' output-projection columns zeroed (loads with plain transformers)."""
    render.emit(api.export(model, ablate, out, from_run=from_run, k=k, dtype=dtype, device=device), as_json, None, render.print_export)


@app.command()
def neurons(
    model: o.Model = DEFAULT_MODEL, task: o.Task = "arithmetic",
    n: int = typer.Option(50, "--n", help="items per split (two disjoint splits are used)"), seed: o.Seed = 0,
    method: str = typer.Option("grad", "--method", help="attribution: grad (activation x gradient) or ig "
                                                       "(integrated gradients)"),
    steps: int = typer.Option(8, "--steps", help="integrated-gradient steps"),
    top_q: float = typer.Option(0.01, "--top-q", help="per item, the top fraction of neurons that counts"),
    min_share: float = typer.Option(0.5, "--min-share", help="share of items a commonality neuron must count in"),
    enhance: str = typer.Option("1.1,1.3,2.0", "--enhance", help="factor(s) for the enhancement test"),
    general: Optional[str] = typer.Option("general", "--general", help="general-capability task for the "
                                          "ablation control ('' to skip)"),
    subtask: o.Subtask = None, shots: o.Shots = None, data: o.Data = None, dtype: o.Dtype = "auto", device: o.Device = "auto", workers: o.Workers = None, ray_address: o.RayAddress = None,
    store: o.Store = None, out: Optional[str] = typer.Option(None, "--out", help="directory: writes OUT/neurons.json"),
    as_json: o.AsJson = False, json_file: o.JsonFile = None, quiet: o.Quiet = False,
):
    """Commonality neurons (CNL): MLP neurons consistently attributed across a capability's items."""
    result = api.neurons(model, task, n, seed, method=method, steps=steps, top_q=top_q, min_share=min_share,
                         enhance=[o.parse_float(f, "enhance") for f in enhance.split(",") if f.strip()],
                         general=general or None, subtask=subtask, shots=shots, data=data, dtype=dtype, device=device, workers=workers, ray_address=ray_address, store=store,
                         out=out, progress=_progress(quiet, as_json))
    render.emit(result, as_json, json_file, render.print_neurons)


@app.command()
def density(
    model: o.Model = DEFAULT_MODEL,
    from_run: Optional[str] = typer.Option(None, "--from", help="also correlate with this locate run's head scores"),
    n_tokens: int = typer.Option(8192, "--tokens", help="SAE training tokens from the offline text stream"),
    expansion: int = typer.Option(4, "--expansion", help="SAE features per head = expansion x head_dim"),
    l1: float = typer.Option(0.1, "--l1", help="SAE sparsity penalty (on unit-mean-norm head outputs)"),
    steps: int = typer.Option(300, "--steps", help="SAE training steps"), seed: o.Seed = 0,
    dtype: o.Dtype = "auto", device: o.Device = "auto", workers: o.Workers = None, ray_address: o.RayAddress = None, out: Optional[str] = typer.Option(None, "--out", help="directory: OUT/density.json"),
    top: int = typer.Option(10, "--top", help="rows to print"), as_json: o.AsJson = False,
    json_file: o.JsonFile = None,
):
    """Per-head capability density (SAE features) and Wanda importance, and how they correlate."""
    result = api.density(model, n_tokens=n_tokens, expansion=expansion, l1=l1, steps=steps, seed=seed,
                         from_run=from_run, dtype=dtype, device=device, workers=workers, ray_address=ray_address, out=out)
    render.emit(result, as_json, json_file, lambda r: render.print_density(r, top))


@app.command()
def compress(
    model: o.Model = DEFAULT_MODEL, target: float = typer.Option(0.3, "--target", help="fraction of heads to remove"),
    allocation: str = typer.Option("density,uniform,wanda", "--allocation",
                                   help="density, uniform, wanda, or several comma-separated"),
    tasks: str = typer.Option("arithmetic,general", "--tasks", help="task scores to report besides perplexity"),
    n: int = typer.Option(50, "--n", help="items per task (and text chunks for perplexity)"), seed: o.Seed = 0,
    data: o.TaskData = None, subtask: o.TaskSubtask = None,
    n_tokens: int = typer.Option(8192, "--tokens", help="SAE training tokens"), dtype: o.Dtype = "auto", device: o.Device = "auto", workers: o.Workers = None, ray_address: o.RayAddress = None,
    store: o.Store = None, out: Optional[str] = typer.Option(None, "--out", help="OUT/compress.json"),
    as_json: o.AsJson = False, json_file: o.JsonFile = None, quiet: o.Quiet = False,
):
    """Remove a fraction of heads with budgets from capability density vs uniform vs Wanda; compare."""
    result = api.compress(model, target, [a.strip() for a in allocation.split(",") if a.strip()], n=n, seed=seed,
                          tasks=tasks, task_options=o.parse_task_options(data, subtask), dtype=dtype, device=device, workers=workers, ray_address=ray_address, store=store,
                          out=out, progress=_progress(quiet, as_json), n_tokens=n_tokens)
    render.emit(result, as_json, json_file, render.print_compress)


@app.command()
def doctor(as_json: o.AsJson = False, json_file: o.JsonFile = None):
    """Which sandbox layers model-written code (humaneval, mbpp) runs under on this machine."""
    render.emit(api.doctor(), as_json, json_file, render.print_doctor)
