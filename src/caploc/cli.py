"""The `caploc` command line. Every command maps to one function of caploc.api."""

from __future__ import annotations

import json
import logging
import sys
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from caploc import api
from caploc.errors import CaplocError
from caploc.models import DEFAULT_MODEL

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Find which components of a transformer carry a capability, and prove it by ablation.")
console = Console(width=None if sys.stdout.isatty() else 160)

ModelOpt = typer.Option(DEFAULT_MODEL, "--model", "-m",
                        help="smollm2-135m, gemma3-270m, an HF hub id, a local model dir, or a .gguf file")
DtypeOpt = typer.Option("float32", "--dtype", help="float32 (exact, default) or bfloat16 (faster)")
TaskOpt = typer.Option("arithmetic", "--task", "-t", help="task name (arithmetic, gsm8k)")
NOpt = typer.Option(100, "--n", help="number of items (deterministic given --seed)")
SeedOpt = typer.Option(0, "--seed", help="seed for item selection and every random choice")
SubtaskOpt = typer.Option(None, "--subtask", help="arithmetic sub-task(s), e.g. 2D+ or 2D+,3D- (default: all 10)")
ShotsOpt = typer.Option(None, "--shots", help="few-shot exemplars (task default when omitted)")
DataOpt = typer.Option(None, "--data", help="dataset: local JSONL/Parquet in the dataset's own schema, or an HF id")
FewshotOpt = typer.Option(None, "--fewshot-data", help="separate file/split for few-shot exemplars")
ChatOpt = typer.Option(None, "--chat/--no-chat", help="wrap prompts in the model's chat template")
ModeOpt = typer.Option("zero", "--mode", help="ablation: zero (default) or mean (mean over the task's prompts)")
JsonOpt = typer.Option(None, "--json", help="also write the full result as JSON to this file")
QuietOpt = typer.Option(False, "--quiet", "-q", help="no progress bars")


def _fmt_interval(mean: float, lo: float, hi: float) -> str:
    return f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"


@app.command()
def eval(  # noqa: A001 - the command is called eval
    model: str = ModelOpt, task: str = TaskOpt, n: int = NOpt, seed: int = SeedOpt,
    ablate: Optional[str] = typer.Option(None, "--ablate", help="heads to ablate, e.g. L3H2,L5H1 (L0 = all of layer 0)"),
    subtask: Optional[str] = SubtaskOpt, shots: Optional[int] = ShotsOpt, data: Optional[str] = DataOpt,
    fewshot_data: Optional[str] = FewshotOpt, chat: Optional[bool] = ChatOpt, dtype: str = DtypeOpt,
    mode: str = ModeOpt, max_new_tokens: Optional[int] = typer.Option(None, help="generation length limit"),
    json_out: Optional[str] = JsonOpt, quiet: bool = QuietOpt,
):
    """Score a task at baseline and with heads ablated: bootstrap 95% intervals and the relative drop."""
    report = api.evaluate(model, task, n, seed, ablate, subtask=subtask, shots=shots, data=data,
                          fewshot_data=fewshot_data, chat=chat, dtype=dtype, mode=mode,
                          max_new_tokens=max_new_tokens, progress=not quiet, json_path=json_out)
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
    method: str = typer.Option(None, "--method", help="css (default), csb, greedy, 1s-greedy, search"),
    k: int = typer.Option(5, "--k", help="number of heads to report and validate"),
    n: int = NOpt, seed: int = SeedOpt,
    n_masks: int = typer.Option(100, "--masks", help="compressed sensing: number of random ablation masks"),
    sparsity: float = typer.Option(0.02, "--sparsity", help="compressed sensing: fraction of heads per mask"),
    alpha: str = typer.Option("cv", "--alpha", help="Lasso penalty: cv (cross-validated) or a number"),
    metric: Optional[str] = typer.Option(None, "--metric", help="identification metric (default: logprob "
                                         "where the target is known, else the task score)"),
    n_validate: Optional[int] = typer.Option(None, "--n-validate", help="held-out items (default: --n)"),
    exclude: Optional[str] = typer.Option(None, "--exclude", help="heads never reported, e.g. universal heads"),
    subtask: Optional[str] = SubtaskOpt, shots: Optional[int] = ShotsOpt, data: Optional[str] = DataOpt,
    fewshot_data: Optional[str] = FewshotOpt, chat: Optional[bool] = ChatOpt, dtype: str = DtypeOpt,
    mode: str = ModeOpt, max_new_tokens: Optional[int] = typer.Option(None, help="generation length limit"),
    store: Optional[str] = typer.Option(None, "--store", help="evaluation store (default: $CAPLOC_CACHE/evaluations.sqlite)"),
    out: Optional[str] = typer.Option(None, "--out", help="run directory: writes OUT/result.json"),
    json_out: Optional[str] = JsonOpt, quiet: bool = QuietOpt,
):
    """Find the heads that carry a capability, then validate them on held-out items."""
    from caploc.methods import DEFAULT_METHOD

    alpha_value = alpha if alpha == "cv" else _parse_float(alpha, "--alpha")
    report = api.locate(model, task, method or DEFAULT_METHOD, k, n, seed, n_masks=n_masks, sparsity=sparsity,
                        alpha=alpha_value, metric=metric, n_validate=n_validate, subtask=subtask, shots=shots,
                        data=data, fewshot_data=fewshot_data, chat=chat, dtype=dtype, mode=mode,
                        max_new_tokens=max_new_tokens, exclude=exclude.split(",") if exclude else None,
                        store=store, out=out, progress=not quiet)
    if json_out:
        api.write_json(json_out, report)
    print_locate(report)
    if out:
        console.print(f"wrote {out}/result.json")


def _parse_float(text: str, name: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise CaplocError(f"{name} must be 'cv' or a number, got {text!r}") from None


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
    b = report["budget"]
    console.print(f"budget: {b['evaluations']} method evaluations ({b['computed_evaluations']} computed, "
                  f"{b['reused_evaluations']} reused from the store), {b['model_tokens']} model tokens, "
                  f"{b['wall_seconds']:.1f} s")


@app.command()
def heads(model: str = ModelOpt, json_out: Optional[str] = JsonOpt,
          as_json: bool = typer.Option(False, "--as-json", help="print JSON instead of a table")):
    """List the model's layers, attention heads and their KV groups."""
    info = api.heads(model)
    if json_out:
        api.write_json(json_out, info)
    if as_json:
        print(json.dumps(info, indent=2))
        return
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
