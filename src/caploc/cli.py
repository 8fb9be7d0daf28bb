"""The `caploc` command line. Every command maps to one function of caploc.api."""

from __future__ import annotations

import json
import logging
import sys
from typing import Callable, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from caploc import api
from caploc.errors import CaplocError
from caploc.methods import DEFAULT_MASKS, DEFAULT_METHOD, DEFAULT_SPARSITY
from caploc.models import DEFAULT_MODEL

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Find which components of a transformer carry a capability, and prove it by ablation.")
console = Console(width=None if sys.stdout.isatty() else 160)

ModelOpt = typer.Option(DEFAULT_MODEL, "--model", "-m",
                        help="smollm2-135m, gemma3-270m, an HF hub id, a local model dir, or a .gguf file")
DtypeOpt = typer.Option("float32", "--dtype", help="float32 (exact, default) or bfloat16 (faster)")
TaskOpt = typer.Option("arithmetic", "--task", "-t",
                       help="task name (arithmetic, gsm8k, humaneval, mbpp, swear, rhyme, hellaswag, arc_challenge, "
                            "boolq, mmlu, wmdp_bio, wmdp_chem, wmdp_cyber, general) or your own JSONL file")
NOpt = typer.Option(100, "--n", help="number of items (deterministic given --seed)")
SeedOpt = typer.Option(0, "--seed", help="seed for item selection and every random choice")
SubtaskOpt = typer.Option(None, "--subtask", help="sub-task(s): arithmetic 2D+,3D- (default all 10); mmlu subjects; "
                                                   "rhyme easy|hard; general categories")
ShotsOpt = typer.Option(None, "--shots", help="few-shot exemplars (task default when omitted)")
DataOpt = typer.Option(None, "--data", help="dataset: local JSONL/Parquet in the dataset's own schema, or an HF id")
FewshotOpt = typer.Option(None, "--fewshot-data", help="separate file/split for few-shot exemplars")
ChatOpt = typer.Option(None, "--chat/--no-chat", help="wrap prompts in the model's chat template")
ModeOpt = typer.Option("zero", "--mode", help="ablation: zero (default) or mean (mean over the task's prompts)")
JsonOpt = typer.Option(False, "--json", help="print the full result as JSON on stdout instead of tables")
JsonFileOpt = typer.Option(None, "--json-file", help="also write the full result as JSON to this file")
QuietOpt = typer.Option(False, "--quiet", "-q", help="no progress bars")
StoreOpt = typer.Option(None, "--store", help="evaluation store (default: $CAPLOC_CACHE/evaluations.sqlite)")
CodeOpt = typer.Option(None, "--allow-code-execution/--no-code-execution",
                       help="let humaneval/mbpp run model-written code (sandboxed child process); "
                            "or set CAPLOC_ALLOW_CODE_EXECUTION=1")


def emit(report: dict, as_json: bool, json_file: Optional[str], show: Callable[[dict], None]) -> None:
    """Tables for people, or the whole result as JSON for programs; optionally also a JSON file."""
    if json_file:
        api.write_json(json_file, report)
    if as_json:
        print(json.dumps(report, indent=2, default=api.json_default))
    else:
        show(report)


def _fmt_interval(mean: float, lo: float, hi: float) -> str:
    return f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"


@app.command()
def eval(  # noqa: A001 - the command is called eval
    model: str = ModelOpt, task: str = TaskOpt, n: int = NOpt, seed: int = SeedOpt,
    ablate: Optional[str] = typer.Option(None, "--ablate", help="heads to ablate, e.g. L3H2,L5H1 (L0 = all of layer 0)"),
    subtask: Optional[str] = SubtaskOpt, shots: Optional[int] = ShotsOpt, data: Optional[str] = DataOpt,
    fewshot_data: Optional[str] = FewshotOpt, chat: Optional[bool] = ChatOpt, dtype: str = DtypeOpt,
    mode: str = ModeOpt, max_new_tokens: Optional[int] = typer.Option(None, help="generation length limit"),
    allow_code_execution: Optional[bool] = CodeOpt, as_json: bool = JsonOpt, json_file: Optional[str] = JsonFileOpt,
    quiet: bool = QuietOpt,
):
    """Score a task at baseline and with heads ablated: bootstrap 95% intervals and the relative drop."""
    report = api.evaluate(model, task, n, seed, ablate, subtask=subtask, shots=shots, data=data,
                          fewshot_data=fewshot_data, chat=chat, allow_code_execution=allow_code_execution,
                          dtype=dtype, mode=mode, max_new_tokens=max_new_tokens, progress=not (quiet or as_json))
    emit(report, as_json, json_file, print_eval)


def print_eval(report: dict) -> None:
    seed, mode = report["seed"], report["mode"]
    title = f"{report['task']['task']} on {report['model']['spec']}: {report['n']} items, seed {seed}"
    if report["ablated_heads"]:
        title += f", ablating {','.join(report['ablated_heads'])} ({mode})"
    table = Table(title=title)
    for col in ("metric", "baseline [95% CI]", "ablated [95% CI]", "drop [paired 95% CI]", "relative drop"):
        table.add_column(col)
    for name, m in report["metrics"].items():
        row = [name, _fmt_interval(m["baseline"], m["baseline_low"], m["baseline_high"])]
        if "ablated" in m:
            row += [_fmt_interval(m["ablated"], m["ablated_low"], m["ablated_high"]),
                    _fmt_interval(m["drop"], m["drop_low"], m["drop_high"]), f"{m['relative_drop']:.1%}"]
        else:
            row += ["-", "-", "-"]
        table.add_row(*row)
    console.print(table)
    b = report["budget"]
    console.print(f"{b['evaluations']} evaluations, {b['tokens']} tokens, {b['seconds']:.1f} s")


@app.command()
def locate(
    model: str = ModelOpt, task: str = TaskOpt,
    method: str = typer.Option(None, "--method", help="csb (default), css, greedy, 1s-greedy, search"),
    k: int = typer.Option(5, "--k", help="number of heads to report and validate"),
    n: int = NOpt, seed: int = SeedOpt,
    n_masks: int = typer.Option(DEFAULT_MASKS, "--masks", help="compressed sensing: number of random ablation masks"),
    sparsity: float = typer.Option(DEFAULT_SPARSITY, "--sparsity", help="compressed sensing: fraction of heads per mask"),
    alpha: str = typer.Option("cv", "--alpha", help="Lasso penalty: cv (cross-validated) or a number"),
    metric: Optional[str] = typer.Option(None, "--metric", help="identification metric (default: logprob "
                                         "where the target is known, else the task score)"),
    n_validate: Optional[int] = typer.Option(None, "--n-validate", help="held-out items (default: --n)"),
    exclude: Optional[str] = typer.Option(None, "--exclude", help="heads never reported, e.g. L0H1,L1"),
    exclude_universal: Optional[str] = typer.Option(None, "--exclude-universal",
                                                    help="never report the heads a `caploc universal` result flags "
                                                         "(its --out directory or universal.json)"),
    subtask: Optional[str] = SubtaskOpt, shots: Optional[int] = ShotsOpt, data: Optional[str] = DataOpt,
    fewshot_data: Optional[str] = FewshotOpt, chat: Optional[bool] = ChatOpt, dtype: str = DtypeOpt,
    mode: str = ModeOpt, max_new_tokens: Optional[int] = typer.Option(None, help="generation length limit"),
    allow_code_execution: Optional[bool] = CodeOpt,
    store: Optional[str] = StoreOpt,
    out: Optional[str] = typer.Option(None, "--out", help="run directory: writes OUT/result.json"),
    as_json: bool = JsonOpt, json_file: Optional[str] = JsonFileOpt, quiet: bool = QuietOpt,
):
    """Find the heads that carry a capability, then validate them on held-out items."""
    alpha_value = alpha if alpha == "cv" else _parse_float(alpha, "--alpha")
    report = api.locate(model, task, method or DEFAULT_METHOD, k, n, seed, n_masks=n_masks, sparsity=sparsity,
                        alpha=alpha_value, metric=metric, n_validate=n_validate, subtask=subtask, shots=shots,
                        data=data, fewshot_data=fewshot_data, chat=chat,
                        allow_code_execution=allow_code_execution, dtype=dtype, mode=mode,
                        max_new_tokens=max_new_tokens, exclude=exclude, exclude_universal=exclude_universal,
                        store=store, out=out, progress=not (quiet or as_json))
    emit(report, as_json, json_file, print_locate)
    if out and not as_json:
        console.print(f"wrote {out}/result.json")


def _parse_float(text: str, name: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise CaplocError(f"{name}: not a number: {text!r}") from None


def print_locate(report: dict) -> None:
    m = report["method"]
    console.print(f"[bold]{m['name']}[/bold] on {report['task']['task']} ({report['model']['spec']}): "
                  f"{report['n']} identification items, {report['n_validate']} held-out, metric {report['metric']}, "
                  f"seed {report['seed']}")
    table = Table(title=f"top-{report['k']} heads ({report['score_name']})")
    for col in ("rank", "head", "score", "KV group"):
        table.add_column(col)
    for h in report["heads"]:
        table.add_row(str(h["rank"]), h["head"], f"{h['score']:.4f}", str(h["kv_group"]))
    console.print(table)
    curve = Table(title="drop on held-out items when ablating the top-j heads (paired 95% CI)")
    curve.add_column("j")
    metrics = list(report["validation"])
    for name in metrics:
        curve.add_column(f"{name} drop")
        curve.add_column(f"{name} rel.")
    for j in range(report["k"]):
        row = [str(j + 1)]
        for name in metrics:
            point = report["validation"][name][j]
            row += [_fmt_interval(point["drop"], point["drop_low"], point["drop_high"]), f"{point['relative_drop']:.1%}"]
        curve.add_row(*row)
    console.print(curve)
    base = report["validation"][metrics[0]][0]
    console.print(f"held-out baseline {metrics[0]} {base['baseline']:.4f}")
    if report.get("details", {}).get("warning"):
        console.print(f"[yellow]warning: {report['details']['warning']}[/yellow]")
    b = report["budget"]
    console.print(f"budget: {b['evaluations']} method evaluations ({b['computed_evaluations']} computed, "
                  f"{b['reused_evaluations']} reused from the store), {b['model_tokens']} model tokens, "
                  f"{b['wall_seconds']:.1f} s")


@app.command()
def heads(model: str = ModelOpt, as_json: bool = JsonOpt, json_file: Optional[str] = JsonFileOpt):
    """List the model's layers, attention heads and their KV groups."""
    emit(api.heads(model), as_json, json_file, print_heads)


def print_heads(info: dict) -> None:
    m = info["model"]
    console.print(f"{m['spec']} ({m['architecture']}): {m['n_layers']} layers x {m['n_heads']} query heads "
                  f"= {m['n_heads_total']} heads; {m['n_kv_heads']} KV heads per layer; head_dim {m['head_dim']}")
    table = Table()
    table.add_column("layer")
    table.add_column("heads (KV group)")
    per_layer: dict[int, list[str]] = {}
    for h in info["heads"]:
        per_layer.setdefault(h["layer"], []).append(f"{h['head']}({h['kv_group']})")
    for layer, names in per_layer.items():
        table.add_row(str(layer), " ".join(names))
    console.print(table)


TasksOpt = typer.Option("arithmetic,general", "--tasks", help="comma-separated tasks (names or JSONL files)")
TaskDataOpt = typer.Option(None, "--data", help="TASK=PATH: a task's dataset (file or HF id); repeatable")
TaskSubtaskOpt = typer.Option(None, "--subtask", help="TASK=VALUE: a task's sub-task(s); repeatable")


def parse_task_options(data: Optional[List[str]], subtask: Optional[List[str]]) -> dict[str, dict]:
    options: dict[str, dict] = {}
    for key, values in (("data", data), ("subtask", subtask)):
        for value in values or []:
            name, sep, setting = value.partition("=")
            if not sep or not name or not setting:
                raise CaplocError(f"--{key} takes TASK=VALUE (e.g. --{key} mmlu=mmlu_test.jsonl), got {value!r}")
            options.setdefault(name.strip(), {})[key] = setting.strip()
    return options


@app.command()
def specificity(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="model (default: the run's, else smollm2-135m)"),
    heads: Optional[str] = typer.Option(None, "--heads", help="heads to ablate, e.g. L3H2,L5H1"),
    from_run: Optional[str] = typer.Option(None, "--from", help="take the top-k heads of a locate run directory"),
    k: Optional[int] = typer.Option(None, "--k", help="with --from: how many of its heads (default: its k)"),
    tasks: str = TasksOpt, n: int = typer.Option(50, "--n", help="items per task"), seed: int = SeedOpt,
    data: Optional[List[str]] = TaskDataOpt, subtask: Optional[List[str]] = TaskSubtaskOpt,
    allow_code_execution: Optional[bool] = CodeOpt,
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 or bfloat16 (default: the run's, else float32)"),
    mode: str = ModeOpt, max_new_tokens: Optional[int] = typer.Option(None, help="generation length limit"),
    store: Optional[str] = StoreOpt,
    out: Optional[str] = typer.Option(None, "--out", help="directory for specificity.json (default: the --from run)"),
    as_json: bool = JsonOpt, json_file: Optional[str] = JsonFileOpt, quiet: bool = QuietOpt,
):
    """Ablate a head set on several tasks: does it break its capability and leave the others standing?"""
    report = api.specificity(model, heads, tasks, n, seed, from_run=from_run, k=k,
                             task_options=parse_task_options(data, subtask),
                             allow_code_execution=allow_code_execution, dtype=dtype, mode=mode,
                             max_new_tokens=max_new_tokens, store=store, out=out, progress=not (quiet or as_json))
    emit(report, as_json, json_file, print_specificity)


def print_specificity(report: dict) -> None:
    table = Table(title=f"ablating {','.join(report['heads'])} on {report['model']['spec']} "
                        f"({report['n']} items per task, seed {report['seed']}, {report['mode']} ablation)")
    for col in ("task", "metric", "baseline [95% CI]", "ablated [95% CI]", "drop [paired 95% CI]", "relative drop"):
        table.add_column(col)
    for name, r in report["tasks"].items():
        table.add_row(name, r["metric"], _fmt_interval(r["baseline"], r["baseline_low"], r["baseline_high"]),
                      _fmt_interval(r["ablated"], r["ablated_low"], r["ablated_high"]),
                      _fmt_interval(r["drop"], r["drop_low"], r["drop_high"]), f"{r['relative_drop']:.1%}")
    g = report["general"]
    if g:
        table.add_row("general average", "", f"{g['baseline']:.3f}", f"{g['ablated']:.3f}",
                      f"{g['baseline'] - g['ablated']:.3f}", f"{g['relative_drop']:.1%}", style="bold")
    console.print(table)
    console.print(f"{report['wall_seconds']:.1f} s")


@app.command()
def universal(
    model: str = ModelOpt, tasks: str = typer.Option("arithmetic,general,rhyme", "--tasks",
                                                      help="comma-separated tasks (at least 2 make sense)"),
    n: int = typer.Option(20, "--n", help="items per task"), seed: int = SeedOpt,
    heads: Optional[str] = typer.Option(None, "--heads", help="candidate heads to scan (default: all)"),
    threshold: float = typer.Option(0.1, "--threshold", help="relative drop that counts as degrading a task"),
    min_tasks: Optional[int] = typer.Option(None, "--min-tasks", help="tasks a universal head must degrade "
                                            "(default: all but one of >= 3 tasks, else all)"),
    top: int = typer.Option(15, "--top", help="rows to print"),
    data: Optional[List[str]] = TaskDataOpt, subtask: Optional[List[str]] = TaskSubtaskOpt,
    allow_code_execution: Optional[bool] = CodeOpt, dtype: str = DtypeOpt, mode: str = ModeOpt,
    max_new_tokens: Optional[int] = typer.Option(None, help="generation length limit"), store: Optional[str] = StoreOpt,
    out: Optional[str] = typer.Option(None, "--out", help="directory: writes OUT/universal.json"),
    as_json: bool = JsonOpt, json_file: Optional[str] = JsonFileOpt, quiet: bool = QuietOpt,
):
    """Ablate every head alone on several tasks and report the heads that degrade most of them at once."""
    report = api.universal(model, tasks, n, seed, candidates=heads, threshold=threshold, min_tasks=min_tasks,
                           task_options=parse_task_options(data, subtask), allow_code_execution=allow_code_execution,
                           dtype=dtype, mode=mode, max_new_tokens=max_new_tokens, store=store, out=out,
                           progress=not (quiet or as_json))
    emit(report, as_json, json_file, lambda r: print_universal(r, top))


def print_universal(report: dict, top: int) -> None:
    names = list(report["metrics"])
    table = Table(title=f"single-head ablations on {report['model']['spec']}: relative drop per task "
                        f"(universal = degrades >= {report['min_tasks']} of {len(names)} tasks by >= "
                        f"{report['threshold']:.0%})")
    table.add_column("head")
    table.add_column("tasks degraded")
    for name in names:
        table.add_column(f"{name} ({report['metrics'][name]})")
    table.add_column("signature")
    for row in report["heads"][:top]:
        signature = []
        for name, sig in row["signature"].items():
            if "repetition" in sig:
                signature.append(f"{name} repetition {sig['repetition_baseline']:.2f}->{sig['repetition']:.2f}")
        table.add_row(row["head"] + (" *" if row["universal"] else ""), str(row["tasks_degraded"]),
                      *[f"{row['relative_drop'][name]:.1%}" for name in names], "; ".join(signature))
    console.print(table)
    flagged = report["universal_heads"]
    console.print(f"universal heads: {', '.join(flagged) if flagged else 'none'}; baselines "
                  + ", ".join(f"{k} {v:.3f}" for k, v in report["baselines"].items())
                  + f"; {report['wall_seconds']:.1f} s")


@app.command()
def compare(run_a: str = typer.Argument(..., help="a locate run directory"),
            run_b: str = typer.Argument(..., help="another locate run directory"),
            k: Optional[int] = typer.Option(None, "--k", help="compare the top-k (default: each run's k)"),
            as_json: bool = JsonOpt, json_file: Optional[str] = JsonFileOpt):
    """Overlap of the heads found by two locate runs (e.g. identified on arithmetic vs on gsm8k)."""
    emit(api.compare(run_a, run_b, k), as_json, json_file, print_compare)


def print_compare(report: dict) -> None:
    table = Table(title="top heads of two runs")
    for path, task, heads in zip(report["runs"], report["tasks"], report["heads"]):
        table.add_column(f"{task} ({path})")
    for a, b in zip(*[h + [""] * (max(map(len, report["heads"])) - len(h)) for h in report["heads"]]):
        shared = set(report["shared"])
        table.add_row(f"[bold]{a}[/bold]" if a in shared else a, f"[bold]{b}[/bold]" if b in shared else b)
    console.print(table)
    spearman = f"{report['spearman']:.3f}" if report["spearman"] is not None else "n/a"
    console.print(f"overlap {report['overlap']} (shared: {', '.join(report['shared']) or 'none'}), "
                  f"Jaccard {report['jaccard']:.2f}, Spearman of per-head scores {spearman}")
    if report.get("note"):
        console.print(report["note"])


@app.command()
def report(run: str = typer.Argument(..., help="a locate run directory (runs/NAME)"),
           out: Optional[str] = typer.Option(None, "--out", help="where to write (default: the run directory)"),
           universal_path: Optional[str] = typer.Option(None, "--universal",
                                                        help="a `caploc universal` result to mark on the heatmap"),
           open_browser: bool = typer.Option(False, "--open", help="open the page in a browser"),
           as_json: bool = JsonOpt):
    """Write report.html (images embedded) and PNG figures for a locate run."""
    emit(api.report(run, out=out, universal_path=universal_path, open_browser=open_browser), as_json, None,
         print_report)


def print_report(written: dict) -> None:
    console.print(f"wrote {written['html']}")
    for name, path in written["figures"].items():
        console.print(f"  {name}: {path}")


@app.command()
def export(model: Optional[str] = typer.Option(None, "--model", "-m", help="model (default: the run's, else "
                                               "smollm2-135m)"),
           ablate: Optional[str] = typer.Option(None, "--ablate", help="heads to remove, e.g. L3H2,L5H1"),
           from_run: Optional[str] = typer.Option(None, "--from", help="remove the top-k heads of a locate run"),
           k: Optional[int] = typer.Option(None, "--k", help="with --from: how many heads (default: the run's k)"),
           out: str = typer.Option(..., "--out", help="new directory for the HF checkpoint"),
           dtype: str = DtypeOpt, as_json: bool = JsonOpt):
    """Save an HF checkpoint with the heads' output-projection columns zeroed (loads with plain transformers)."""
    emit(api.export(model, ablate, out, from_run=from_run, k=k, dtype=dtype), as_json, None,
         lambda w: console.print(f"wrote {w['out']}: {w['model']['spec']} without {', '.join(w['removed_heads'])}"))


@app.command()
def neurons(
    model: str = ModelOpt, task: str = TaskOpt, n: int = typer.Option(50, "--n", help="items per split (two "
                                                                        "disjoint splits are used)"),
    seed: int = SeedOpt,
    method: str = typer.Option("grad", "--method", help="attribution: grad (activation x gradient) or ig "
                                                       "(integrated gradients)"),
    steps: int = typer.Option(8, "--steps", help="integrated-gradient steps"),
    top_q: float = typer.Option(0.01, "--top-q", help="per item, the top fraction of neurons that counts"),
    min_share: float = typer.Option(0.5, "--min-share", help="share of items a commonality neuron must count in"),
    enhance: str = typer.Option("1.1,1.3,2.0", "--enhance", help="factor(s) for the enhancement test"),
    general: Optional[str] = typer.Option("general", "--general", help="general-capability task for the "
                                          "ablation control ('' to skip)"),
    subtask: Optional[str] = SubtaskOpt, shots: Optional[int] = ShotsOpt, data: Optional[str] = DataOpt,
    dtype: str = DtypeOpt, store: Optional[str] = StoreOpt,
    out: Optional[str] = typer.Option(None, "--out", help="directory: writes OUT/neurons.json"),
    as_json: bool = JsonOpt, json_file: Optional[str] = JsonFileOpt, quiet: bool = QuietOpt,
):
    """Commonality neurons (CNL): MLP neurons consistently attributed across a capability's items."""
    report = api.neurons(model, task, n, seed, method=method, steps=steps, top_q=top_q, min_share=min_share,
                         enhance=[_parse_float(f, "--enhance") for f in enhance.split(",") if f.strip()],
                         general=general or None, subtask=subtask, shots=shots, data=data,
                         dtype=dtype, store=store, out=out, progress=not (quiet or as_json))
    emit(report, as_json, json_file, print_neurons)


def print_neurons(report: dict) -> None:
    o, rule = report["overlap"], report["rule"]
    console.print(f"{len(report['neurons'])} commonality neurons of {rule['n_neurons_total']} "
                  f"(top {rule['top_q']:.1%} of an item's neurons, positive, in >= {rule['min_share']:.0%} of "
                  f"{report['n']} items; {report['attribution']['method']} attribution)")
    console.print(f"split A vs disjoint split B: overlap rate {o['overlap_rate']:.1%} ({o['shared']} of "
                  f"{o['n_a']}), IoU {o['iou']:.3f}; per layer: {report['per_layer']}")
    table = Table(title="ablating split A's neurons vs as many random neurons (on split B / general items)")
    for col in ("task", "metric", "baseline", "located: drop [95% CI]", "rel.", "random: drop [95% CI]", "rel."):
        table.add_column(col)
    for label, r in report["ablation"].items():
        loc, rnd = r["located"], r["random"]
        table.add_row(f"{label} ({r['task']['task']})", r["metric"], f"{loc['baseline']:.3f}",
                      _fmt_interval(loc["drop"], loc["drop_low"], loc["drop_high"]), f"{loc['relative_drop']:.1%}",
                      _fmt_interval(rnd["drop"], rnd["drop_low"], rnd["drop_high"]), f"{rnd['relative_drop']:.1%}")
    console.print(table)
    for e in report["enhancement"]:
        console.print(f"enhancement x{e['factor']} (split B): " + ", ".join(
            f"{m} {v['baseline']:.3f} -> {v['ablated']:.3f} (random neurons: {e['random_metrics'][m]['ablated']:.3f})"
            for m, v in e["metrics"].items()))
    console.print(f"{report['wall_seconds']:.1f} s")


@app.command()
def density(
    model: str = ModelOpt, from_run: Optional[str] = typer.Option(None, "--from", help="also correlate with "
                                                                   "this locate run's head scores"),
    n_tokens: int = typer.Option(8192, "--tokens", help="SAE training tokens from the offline text stream"),
    expansion: int = typer.Option(4, "--expansion", help="SAE features per head = expansion x head_dim"),
    l1: float = typer.Option(0.1, "--l1", help="SAE sparsity penalty (on unit-mean-norm head outputs)"),
    steps: int = typer.Option(300, "--steps", help="SAE training steps"), seed: int = SeedOpt,
    dtype: str = DtypeOpt, out: Optional[str] = typer.Option(None, "--out", help="directory: OUT/density.json"),
    top: int = typer.Option(10, "--top", help="rows to print"),
    as_json: bool = JsonOpt, json_file: Optional[str] = JsonFileOpt,
):
    """Per-head capability density (SAE features) and Wanda importance, and how they correlate."""
    report = api.density(model, n_tokens=n_tokens, expansion=expansion, l1=l1, steps=steps, seed=seed,
                         from_run=from_run, dtype=dtype, out=out)
    emit(report, as_json, json_file, lambda r: print_density(r, top))


def print_density(report: dict, top: int) -> None:
    import numpy as np

    d = np.asarray(report["density"])
    table = Table(title=f"densest heads of {report['model']['spec']} (of {len(d)})")
    for col in ("head", "density", "breadth", "entropy", "consistency", "Wanda"):
        table.add_column(col)
    for i in np.argsort(-d)[:top]:
        table.add_row(report["heads"][i], f"{d[i]:.3f}", f"{report['breadth'][i]:.3f}",
                      f"{report['entropy'][i]:.3f}", f"{report['consistency'][i]:.3f}", f"{report['wanda'][i]:.1f}")
    console.print(table)
    final = report["training"]["final"]
    console.print(f"SAE: reconstruction MSE {final['mse']:.4f}, {final['l0']:.1f} active features per token; "
                  f"Spearman(density, Wanda) = {report['spearman_density_wanda']:.3f}"
                  + (f"; Spearman(density, head scores) = {report['spearman_density_head_scores']:.3f}"
                     if "spearman_density_head_scores" in report else ""))


@app.command()
def compress(
    model: str = ModelOpt, target: float = typer.Option(0.3, "--target", help="fraction of heads to remove"),
    allocation: str = typer.Option("density,uniform,wanda", "--allocation",
                                   help="density, uniform, wanda, or several comma-separated"),
    tasks: str = typer.Option("arithmetic,general", "--tasks", help="task scores to report besides perplexity"),
    n: int = typer.Option(50, "--n", help="items per task (and text chunks for perplexity)"), seed: int = SeedOpt,
    data: Optional[List[str]] = TaskDataOpt, subtask: Optional[List[str]] = TaskSubtaskOpt,
    n_tokens: int = typer.Option(8192, "--tokens", help="SAE training tokens"), dtype: str = DtypeOpt,
    store: Optional[str] = StoreOpt, out: Optional[str] = typer.Option(None, "--out", help="OUT/compress.json"),
    as_json: bool = JsonOpt, json_file: Optional[str] = JsonFileOpt, quiet: bool = QuietOpt,
):
    """Remove a fraction of heads with budgets from capability density vs uniform vs Wanda; compare."""
    report = api.compress(model, target, [a.strip() for a in allocation.split(",") if a.strip()], n=n, seed=seed,
                          tasks=tasks, task_options=parse_task_options(data, subtask), dtype=dtype, store=store,
                          out=out, progress=not (quiet or as_json), n_tokens=n_tokens)
    emit(report, as_json, json_file, print_compress)


def print_compress(report: dict) -> None:
    keys = [k for k in report["rows"][0] if k not in ("allocation", "removed", "per_layer", "heads")]
    table = Table(title=f"removing {report['target']:.0%} of the heads of {report['model']['spec']}")
    for col in ["allocation", "heads removed"] + keys:
        table.add_column(col)
    for row in report["rows"]:
        table.add_row(row["allocation"], str(row["removed"]), *[f"{row[k]:.4f}" for k in keys])
    console.print(table)
    console.print(f"Spearman(density, Wanda) = {report['spearman_density_wanda']:.3f}; {report['wall_seconds']:.1f} s")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        app(standalone_mode=False)
    except CaplocError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: completed evaluations are kept", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # usage errors and anything unexpected: one line, no traceback
        exit_code = getattr(exc, "exit_code", None)
        if hasattr(exc, "show") and exit_code is not None:  # click/typer usage errors print themselves
            exc.show()
            sys.exit(exit_code)
        if type(exc).__name__ in ("Exit", "Abort"):
            sys.exit(exit_code or (0 if type(exc).__name__ == "Exit" else 1))
        print(f"error: {type(exc).__name__}: {exc}".splitlines()[0], file=sys.stderr)
        sys.exit(1)

if __name__ == "__main__":
    main()
