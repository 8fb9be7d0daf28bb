"""The `caploc` commands: each takes the specs the library declares (expanded into flags by `expand`), calls its
API function, and renders the typed result. `build()` makes the app from what is registered at that moment,
so methods and tasks registered by a plugin (or a test module) appear in it."""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import typer

from caploc import api
from caploc.cli import options as o
from caploc.cli import render
from caploc.cli.expand import expanded, note_registry_flags
from caploc.errors import ParameterError
from caploc.experiments.density import SAEOptions
from caploc.experiments.locate import Criterion, LocateOptions
from caploc.experiments.neurons import CNLOptions
from caploc.experiments.specs import EvalOptions, ModelSpec, TaskSpec, TaskSuite
from caploc.methods import DEFAULT_METHOD, METHODS
from caploc.tasks import TASKS


def _size(k: str) -> int | str:
    if k.strip().lower() == "auto":
        return "auto"
    try:
        return int(k)
    except ValueError:
        raise ParameterError(f"{{k}} must be a positive integer or auto, got {k!r}", "k") from None


def _progress(evaluation: EvalOptions, quiet: bool, as_json: bool) -> EvalOptions:
    return replace(evaluation, progress=not (quiet or as_json))


def eval(  # noqa: A001 - the command is called eval
    model: ModelSpec, task: TaskSpec,
    ablate: Optional[str] = typer.Option(None, "--ablate", help="heads to ablate, e.g. L3H2,L5H1 (L0 = all of layer 0)"),
    evaluation: EvalOptions = EvalOptions(), as_json: o.AsJson = False, json_file: o.JsonFile = None,
    quiet: o.Quiet = False,
):
    """Score a task at baseline and with heads ablated: bootstrap 95% intervals and the relative drop."""
    result = api.evaluate(model, task, ablate, evaluation=_progress(evaluation, quiet, as_json))
    render.emit(result, as_json, json_file, render.print_eval)


def locate(
    model: ModelSpec, task: TaskSpec, criterion: Criterion, options: LocateOptions,
    method: str = typer.Option(DEFAULT_METHOD, "--method", help="the localization method (`caploc methods` lists "
                               f"them; default {DEFAULT_METHOD}: a screen nominates candidates, exact greedy picks "
                               "among them)"),
    k: str = typer.Option("5", "--k", help="number of heads to report and validate, or auto (joint: the smallest "
                          "set that keeps most of what its candidates remove)"),
    evaluation: EvalOptions = EvalOptions(),
    out: Optional[str] = typer.Option(None, "--out", help="run directory: writes OUT/result.json"),
    as_json: o.AsJson = False, json_file: o.JsonFile = None, quiet: o.Quiet = False, method_params: dict = None,
):
    """Find the heads that carry a capability, then validate them on held-out items."""
    result = api.locate(model, task, api.make_method(method, **method_params), k=_size(k), criterion=criterion,
                        options=options, evaluation=_progress(evaluation, quiet, as_json), out=out)
    render.emit(result, as_json, json_file, render.print_locate)
    if out and not as_json:
        render.console.print(f"wrote {out}/result.json")


def heads(model: ModelSpec,
          scores: Optional[str] = typer.Option(None, "--scores", help="also score every head by the attention "
                                               "signature of a task that has one: induction (prefix-matching and "
                                               "previous-token attention on repeated random tokens) or ioi "
                                               "(attention from the last token to the indirect object and to the "
                                               "subject)"),
          seed: o.Seed = 0, as_json: o.AsJson = False, json_file: o.JsonFile = None):
    """List the model's layers, attention heads and their KV groups (and per-head scores)."""
    render.emit(api.heads(model, scores=scores, seed=seed), as_json, json_file, render.print_heads)


def specificity(
    model: ModelSpec, suite: TaskSuite,
    heads: Optional[str] = typer.Option(None, "--heads", help="heads to ablate, e.g. L3H2,L5H1"),
    from_run: o.FromRun = None, k: o.RunK = None, evaluation: EvalOptions = EvalOptions(),
    out: Optional[str] = typer.Option(None, "--out", help="directory for specificity.json (default: the --from run)"),
    as_json: o.AsJson = False, json_file: o.JsonFile = None, quiet: o.Quiet = False,
):
    """Ablate a head set on several tasks: does it break its capability and leave the others standing?
    (--model and --dtype default to the --from run's.)"""
    result = api.specificity(model, heads, suite, from_run=from_run, k=k,
                             evaluation=_progress(evaluation, quiet, as_json), out=out)
    render.emit(result, as_json, json_file, render.print_specificity)


def universal(
    model: ModelSpec, suite: TaskSuite = TaskSuite("arithmetic,general,rhyme", n=20),
    heads: Optional[str] = typer.Option(None, "--heads", help="candidate heads to scan (default: all)"),
    threshold: float = typer.Option(0.1, "--threshold", help="relative drop that counts as degrading a task"),
    min_tasks: Optional[int] = typer.Option(None, "--min-tasks", help="tasks a universal head must degrade "
                                            "(default: all but one of >= 3 tasks, else all)"),
    top: int = typer.Option(15, "--top", help="rows to print"), evaluation: EvalOptions = EvalOptions(),
    out: Optional[str] = typer.Option(None, "--out", help="directory: writes OUT/universal.json"),
    as_json: o.AsJson = False, json_file: o.JsonFile = None, quiet: o.Quiet = False,
):
    """Ablate every head alone on several tasks and report the heads that degrade most of them at once."""
    result = api.universal(model, suite, candidates=heads, threshold=threshold, min_tasks=min_tasks,
                           evaluation=_progress(evaluation, quiet, as_json), out=out)
    render.emit(result, as_json, json_file, lambda r: render.print_universal(r, top))


def compare(run_a: str = typer.Argument(..., help="a locate run directory"),
            run_b: str = typer.Argument(..., help="another locate run directory"),
            k: Optional[int] = typer.Option(None, "--k", help="compare the top-k (default: each run's k)"),
            as_json: o.AsJson = False, json_file: o.JsonFile = None):
    """Overlap of the heads found by two locate runs (e.g. identified on arithmetic vs on gsm8k)."""
    render.emit(api.compare(run_a, run_b, k), as_json, json_file, render.print_compare)


def report(run: str = typer.Argument(..., help="a locate run directory (runs/NAME)"),
           out: Optional[str] = typer.Option(None, "--out", help="where to write (default: the run directory)"),
           universal_path: Optional[str] = typer.Option(None, "--universal",
                                                        help="a `caploc universal` result to mark on the heatmap"),
           open_browser: bool = typer.Option(False, "--open", help="open the page in a browser"),
           as_json: o.AsJson = False):
    """Write report.html (images embedded) and PNG figures for a locate run."""
    render.emit(api.report(run, out=out, universal_path=universal_path, open_browser=open_browser), as_json, None,
                render.print_report)


def export(model: ModelSpec,
           ablate: Optional[str] = typer.Option(None, "--ablate", help="heads to remove, e.g. L3H2,L5H1"),
           from_run: Optional[str] = typer.Option(None, "--from", help="remove the top-k heads of a locate run (and "
                                                  "take its model when --model is not given)"),
           k: o.RunK = None, out: str = typer.Option(..., "--out", help="new directory for the HF checkpoint"),
           as_json: o.AsJson = False):
    """Save an HF checkpoint with the heads' output-projection columns zeroed (loads with plain transformers)."""
    render.emit(api.export(model, ablate, out, from_run=from_run, k=k), as_json, None, render.print_export)


def neurons(model: ModelSpec, task: TaskSpec = TaskSpec(n=50), options: CNLOptions = CNLOptions(),
            evaluation: EvalOptions = EvalOptions(),
            out: Optional[str] = typer.Option(None, "--out", help="directory: writes OUT/neurons.json"),
            as_json: o.AsJson = False, json_file: o.JsonFile = None, quiet: o.Quiet = False):
    """Commonality neurons (CNL): MLP neurons consistently attributed across a capability's items."""
    result = api.neurons(model, task, options, evaluation=_progress(evaluation, quiet, as_json), out=out)
    render.emit(result, as_json, json_file, render.print_neurons)


def density(model: ModelSpec, sae: SAEOptions,
            from_run: Optional[str] = typer.Option(None, "--from", help="also correlate with this locate run's "
                                                   "head scores"),
            out: Optional[str] = typer.Option(None, "--out", help="directory: OUT/density.json"),
            top: int = typer.Option(10, "--top", help="rows to print"), as_json: o.AsJson = False,
            json_file: o.JsonFile = None):
    """Per-head capability density (SAE features) and Wanda importance, and how they correlate."""
    render.emit(api.density(model, sae, from_run=from_run, out=out), as_json, json_file,
                lambda r: render.print_density(r, top))


def compress(model: ModelSpec, sae: SAEOptions, suite: TaskSuite = TaskSuite("arithmetic,general", n=50),
             target: float = typer.Option(0.3, "--target", help="fraction of heads to remove"),
             allocation: str = typer.Option("density,uniform,wanda", "--allocation",
                                            help="density, uniform, wanda, or several comma-separated"),
             evaluation: EvalOptions = EvalOptions(),
             out: Optional[str] = typer.Option(None, "--out", help="OUT/compress.json"),
             as_json: o.AsJson = False, json_file: o.JsonFile = None, quiet: o.Quiet = False):
    """Remove a fraction of heads with budgets from capability density vs uniform vs Wanda; compare."""
    result = api.compress(model, target, [a.strip() for a in allocation.split(",") if a.strip()], suite, sae,
                          evaluation=_progress(evaluation, quiet, as_json), out=out)
    render.emit(result, as_json, json_file, render.print_compress)


def doctor(as_json: o.AsJson = False, json_file: o.JsonFile = None):
    """Which sandbox layers model-written code (humaneval, mbpp) runs under on this machine."""
    render.emit(api.doctor(), as_json, json_file, render.print_doctor)


def tasks():
    """The registered tasks: kind, metrics, what each is, and the parameters --task-arg sets."""
    render.print_registry("task", TASKS)


def methods():
    """The registered localization methods: what each does and the flags that set its parameters."""
    render.print_registry("method", METHODS)


COMMANDS = {"eval": (eval, None), "locate": (locate, METHODS), "heads": (heads, None),
            "specificity": (specificity, None), "universal": (universal, None), "compare": (compare, None),
            "report": (report, None), "export": (export, None), "neurons": (neurons, None),
            "density": (density, None), "compress": (compress, None), "doctor": (doctor, None),
            "tasks": (tasks, None), "methods": (methods, None)}


def build() -> typer.Typer:
    """The command-line app, from what is registered now."""
    app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                      help="Find which components of a transformer carry a capability, and prove it by ablation.")
    for name, (fn, registry) in COMMANDS.items():
        app.command(name=name)(expanded(registry)(fn))
    note_registry_flags(TASKS, lambda p: f"--task-arg {p.name}")
    return app
