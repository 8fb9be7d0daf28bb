"""The paper's Table 2 on models that have the capabilities: for each task, the top-5 heads each method finds on
identification items, and what ablating them does to the task's real metric (accuracy, or pass@1 run in the
sandbox) on held-out items no identification used (every seed's set on the first seed's held-out items), beside the reference's log-probability, `general`
accuracy, and five random heads (mean of three draws) as the floor.

Per task: the default (`refine`, control `general`) on every seed (its top-5 overlap across seeds), and the
paper's CSS (`css`, no control) and one-shot greedy (`1s-greedy`, no control) on the first seed; tokens and
wall time of each locate. Every evaluation goes to the store, so a killed run resumes where it stopped. A task
the model does not do (held-out accuracy or pass@1 below 0.1, or no swear word at all) is recorded as
`lacks_capability` with its baseline, and nothing is located on it.

    python bench/paper_table.py --model qwen2.5-coder-0.5b --tasks 2D+,mbpp,humaneval --seeds 0,1,2
    python bench/paper_table.py --model qwen2.5-coder-1.5b --tasks gsm8k,mbpp --seeds 0
    python bench/paper_table.py --tasks mbpp --seeds 0 --methods refine --import-run "mbpp:refine seed 0=runs/mbpp/result.json"
    python bench/paper_table.py --model qwen2.5-coder-0.5b --tasks 2D+ --methods joint \
        --option joint:layers=2 --option joint:layer_keep=5

`--metric own_logprob` identifies on the model's own completions of the identification items it does, instead of the
dataset's references (runs labelled `refine/own_logprob seed 0`).

`--import-run` takes a locate already run with the CLI (`caploc locate ... --out DIR`, the same task, n, seed and
method) as that table entry instead of running it again; the entry records the file it came from.

Task names: an arithmetic sub-task (2D+, 3D-, ... or `arithmetic` for all ten), gsm8k, mbpp (mbpp_lf: its code
with "\n" line endings), humaneval (the two code tasks run model-written code in caploc's sandbox), swear, rhyme.
GSM8K and MBPP read their non-test splits from ../shared/data (GSM8K train; MBPP's prompt, validation and train
task ids).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

import numpy as np

from caploc import (CaplocError, Criterion, EvalOptions, LocateOptions, LocateResult, TaskSpec, load_model, locate,
                    make_method)
from caploc.evaluator import Evaluator
from caploc.experiments.locate import DEFAULT_N_CONTROL
from caploc.experiments.specs import parse_assignments
from caploc.methods import METHODS
from caploc.params import coerce
from caploc.stats import LOW_BASELINE, paired_drop
from caploc.store import EvalStore
from caploc.tasks import get_task
from caploc.tasks.arithmetic import SUBTASKS

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PAPER_METHODS = {"css": {"n_masks": 100, "sparsity": 0.05}, "1s-greedy": {}}
POOL_SIZES = {"swear": {"n": 12, "n_heldout": 12}}  # identification and held-out items where the pool is small
CONTROLS = {"refine": "general", "joint": "general,text"}  # the paper's methods run without a control


def method_options(given: list[str]) -> dict[str, dict]:
    """--option METHOD:NAME=VALUE, by method, each value typed by the method's declaration (as the CLI's)."""
    by_method = {}
    for option in given:
        method, _, assignment = option.partition(":")
        by_method.setdefault(method, []).append(assignment)
    try:
        options = {}
        for method, assignments in by_method.items():
            declared = {p.name: p for p in METHODS[method].params}
            options[method] = {name: coerce(value, declared[name].annotation, name) if name in declared else value
                               for name, value in parse_assignments(assignments, "option").items()}
        return options
    except CaplocError as exc:  # one line, before the model loads
        raise SystemExit(f"--option: {exc} (METHOD:NAME=VALUE, e.g. joint:layer_keep=5)") from None


def task_spec(name: str) -> dict:
    """The task behind a table row and the options it is built with."""
    if name in SUBTASKS or name == "arithmetic":
        return {"task": "arithmetic", "subtask": None if name == "arithmetic" else name}
    if name == "gsm8k":
        return {"task": "gsm8k", "data": str(DATA / "gsm8k_train.jsonl"), "shots": 8}
    if name in ("mbpp", "mbpp_lf"):  # mbpp_lf: exemplars and references with "\n" line endings, not MBPP's "\r\n"
        return {"task": "mbpp", "data": str(DATA / "mbpp_train.jsonl"), "allow_code_execution": True} | (
            {"line_endings": "lf"} if name == "mbpp_lf" else {})
    if name == "humaneval":
        return {"task": "humaneval", "allow_code_execution": True}
    return {"task": name}


def build_task(name: str):
    """The task behind a table row, built."""
    spec = task_spec(name)
    return get_task(spec["task"], **{k: v for k, v in spec.items() if k != "task" and v is not None})


def real_metric(task) -> str:
    return task.default_metric


def real_metrics(task) -> list[str]:
    """The real metric and its variants, each a column of the table (gsm8k: `acc` and `acc_strict`, lm-eval's
    flexible-extract and strict-match)."""
    main = real_metric(task)
    return [main] + [m for m in task.metric_names() if m.startswith(main + "_")]


def random_sets(n_components: int, k: int, draws: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng([seed, 0x5EED])
    return [sorted(int(i) for i in rng.choice(n_components, k, replace=False)) for _ in range(draws)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--tasks", default="2D+,mbpp,humaneval")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default="refine,css,1s-greedy", help="the methods; those in --every-seed run "
                        "on every seed, the others on the first")
    parser.add_argument("--every-seed", default="refine,joint")
    parser.add_argument("--metric", default=None, help="identification metric (default: the task's; own_logprob: "
                        "the model's own completions of the items it does); its runs are labelled METHOD/METRIC")
    parser.add_argument("--n", type=int, default=30, help="identification items")
    parser.add_argument("--n-heldout", type=int, default=100, help="held-out items for the real metric")
    parser.add_argument("--n-general", type=int, default=100, help="held-out general items")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--random-draws", type=int, default=3)
    parser.add_argument("--bootstrap", type=int, default=0)
    parser.add_argument("--store", default="bench/paper_table.sqlite")
    parser.add_argument("--json", default=None, help="default: bench/paper_table_MODEL.json")
    parser.add_argument("--option", action="append", default=[], metavar="METHOD:NAME=VALUE",
                        help="a method parameter ('joint:layer_keep=5'); repeatable; the runs are labelled "
                        "METHOD[NAME=VALUE]")
    parser.add_argument("--import-run", action="append", default=[], metavar="TASK:LABEL=RESULT_JSON",
                        help="a CLI locate's result.json as the entry LABEL ('refine seed 0') of TASK; repeatable")
    args = parser.parse_args()

    os.environ.setdefault("CAPLOC_ALLOW_CODE_EXECUTION", "1")
    out = Path(args.json or f"bench/paper_table_{args.model}.json")
    previous = json.loads(out.read_text()) if out.exists() else {}
    tables = previous.get("tasks", {})
    lm = load_model(args.model, dtype=args.dtype)
    store = EvalStore(args.store)
    evaluation = EvalOptions(store=store)
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    general = get_task("general")
    imported = imported_runs(args)
    options = method_options(args.option)
    for name in args.tasks.split(","):
        task = build_task(name)
        row = tables.get(name, {"task": name, "runs": {}})
        row.setdefault("runs", {}).update(imported.get(name, {}))
        task_args = table_args(args, name)
        row["params"] = vars(task_args)  # the top-level params are the last invocation's
        started = time.perf_counter()
        # the real metric's held-out items: the first seed's, after its identification items
        held_items = task.items(task_args.n_heldout, seeds[0], offset=task_args.n)
        lacking = lacks_capability(lm, task, held_items, store)
        if lacking:
            # a head that "carries" a capability the model does not have is measured on noise: say so, locate nothing
            print(f"{args.model} {name}: {lacking['reason']}; no locate", flush=True)
            tables[name] = {"task": name, "params": row["params"], "lacks_capability": lacking}
            write(out, args, tables)
            continue
        for method in methods:
            for seed in seeds if method in args.every_seed.split(",") else seeds[:1]:
                params = PAPER_METHODS.get(method, {}) | options.get(method, {})
                entry = method + "".join(f"[{k}={v}]" for k, v in options.get(method, {}).items())
                label = f"{entry}/{args.metric} seed {seed}" if args.metric else f"{entry} seed {seed}"
                if label in row["runs"]:
                    continue
                control = CONTROLS.get(method, "none")
                # held-out items for the real metric come from the first seed's order; the locate's own
                # validation is small for the other seeds (only their heads are compared)
                n_validate = task_args.n_heldout if seed == seeds[0] else 10
                t0 = time.perf_counter()
                run = locate(lm, TaskSpec(task, n=task_args.n, n_validate=n_validate, seed=seed),
                             make_method(method, **params), k=task_args.k,
                             criterion=Criterion(metric=args.metric, control=control),
                             options=LocateOptions(bootstrap=task_args.bootstrap), evaluation=evaluation)
                row["runs"][label] = run_entry(run, task_args.k) | {"wall_seconds": round(time.perf_counter() - t0, 1)}
                print(f"{args.model} {name} {label}: {row['runs'][label]}", flush=True)
                tables[name] = row
                write(out, args, tables)
        held_out = held_out_table(lm, task, row, task_args, held_items, seeds[0], store, general)
        row["held_out"] = held_out
        row["overlap"] = seed_overlap(row["runs"])
        row["seconds_total"] = round(row.get("seconds_total", 0) + time.perf_counter() - started, 1)
        tables[name] = row
        write(out, args, tables)
    print_table(tables, args)


def seed_overlap(runs: dict[str, dict]) -> dict[str, dict]:
    """Each method's top-k overlap across every seed the table holds for it (an invocation may add one seed to a
    table that has the others): pairwise in seed order, and the heads in every seed's set."""
    by_method: dict[str, dict[int, set]] = {}
    for label, run in runs.items():
        method, _, seed = label.rpartition(" seed ")
        by_method.setdefault(method, {})[int(seed)] = set(run["top"])
    overlap = {}
    for method, tops in by_method.items():
        sets = [tops[seed] for seed in sorted(tops)]
        if len(sets) > 1:
            overlap[method] = {"seeds": sorted(tops),
                               "pairwise": [len(a & b) for a, b in itertools.combinations(sets, 2)],
                               "in_every_seed": sorted(set.intersection(*sets))}
    return overlap


def table_args(args, name: str) -> argparse.Namespace:
    """The table's settings for one task: the command line's, with the item counts of a small pool (swear has
    24 prompts, two halves of 12)."""
    return argparse.Namespace(**vars(args) | POOL_SIZES.get(name, {}))


def run_entry(run: LocateResult, k: int) -> dict:
    """A table entry: a locate's top-k heads, its metric and its cost."""
    return {"top": run.top_heads(k), "metric": run.metric, "tokens": run.budget["logical_model_tokens"],
            "computed_tokens": run.budget["model_tokens"], "locate_seconds": run.budget["wall_seconds"]} | (
        {"own_reference": run.extra["own_reference"]} if "own_reference" in run.extra else {})


def imported_runs(args) -> dict[str, dict[str, dict]]:
    """--import-run entries by task, each checked against the table's own settings: the same model, task,
    method, identification items and seed as the locate the table would run."""
    runs: dict[str, dict[str, dict]] = {}
    for entry in args.import_run:
        target, _, path = entry.partition("=")
        name, _, label = target.partition(":")
        method, _, seed = label.partition(" seed ")
        if not (path and method and seed.isdigit()):
            raise SystemExit(f"--import-run {entry!r}: expected TASK:METHOD seed N=RESULT_JSON")
        try:
            run = LocateResult.load(path)
        except CaplocError as exc:
            raise SystemExit(str(exc)) from None
        spec, task_args = task_spec(name), table_args(args, name)
        expected = {"model": args.model, "task": spec["task"], "method": method, "n": task_args.n,
                    "seed": int(seed), "k": args.k, "control": CONTROLS.get(method, "none")}
        found = {"model": run.model.get("spec"), "task": run.task["task"], "method": run.method["name"],
                 "n": run.n, "seed": run.seed, "k": run.k,
                 "control": ",".join(t["task"] for t in run.control.get("tasks") or []) or "none"}
        if "shots" in spec:
            found["shots"], expected["shots"] = run.task["shots"], spec["shots"]
        if spec.get("subtask") and run.task_options.get("subtask") not in (spec["subtask"], [spec["subtask"]]):
            found["subtask"], expected["subtask"] = run.task_options.get("subtask"), spec["subtask"]
        if found != expected:
            raise SystemExit(f"{path}: --import-run {target!r} expects {expected}, the file has {found}")
        runs.setdefault(name, {})[label] = run_entry(run, args.k) | {"imported_from": path}
    return runs


def lacks_capability(lm, task, items, store) -> dict | None:
    """The unablated real metric on the held-out items (the store keeps it for the table), or None when the model
    has the capability: accuracy-like metrics at least LOW_BASELINE, counts (swear words) above zero."""
    metric = real_metric(task)
    baseline = float(Evaluator(lm, task, items, store=store).baseline().scores[metric].mean())
    floor = LOW_BASELINE if metric in ("acc", "pass@1") else 0.0
    if (baseline >= floor) if floor else (baseline > 0):  # an accuracy reaches the floor, a count is above zero
        return None
    what = f"{metric} {baseline:.3f} on {len(items)} held-out items" + (f" < {floor}" if floor else "")
    return {"metric": metric, "baseline": baseline, "n": len(items), "floor": floor,
            "reason": f"the model does not have the capability: {what}"}


def held_out_table(lm, task, row, args, items, seed, store, general) -> dict:
    """Every run's top-k (every seed's, on the first seed's held-out items) and the random sets, ablated: the
    real metric, the reference's log-probability where the task has one, and held-out `general` accuracy."""
    layout = lm.layout
    sets = {label: [layout.index(layout.parse(h)) for h in r["top"]] for label, r in row["runs"].items()}
    randoms = random_sets(layout.n_total, args.k, args.random_draws, seed)
    masks = [[]] + list(sets.values()) + randoms
    out = {"n": len(items), "runs": {}, "random": {}}

    def record(metric, values):
        base = values[0]
        for j, label in enumerate(sets, 1):
            out["runs"].setdefault(label, {})[metric] = paired_drop(base, values[j], metric=metric) | {
                "baseline": float(base.mean()), "ablated": float(values[j].mean())}
        ablated = values[len(sets) + 1:]
        if len(ablated) == 0:  # --random-draws 0
            return
        drops = [paired_drop(base, a, metric=metric)["relative_drop"] for a in ablated]
        out["random"][metric] = {"relative_drop": float(np.mean(drops)), "baseline": float(base.mean()),
                                 "ablated": float(np.mean([a.mean() for a in ablated])),
                                 "draws": [float(d) for d in drops]}

    for scoring in task.scorings():
        scores = Evaluator(lm, scoring, scoring.from_source(items), store=store, progress=True).evaluate(masks).scores
        for metric, values in scores.items():
            record(metric, values)
    # general accuracy on items no identification used (the control identification items come first)
    general_items = general.items(args.n_general, seed, offset=DEFAULT_N_CONTROL)
    record("general_acc", Evaluator(lm, general, general_items, store=store).evaluate(masks).scores["acc"])
    out["random_sets"] = [[str(layout.head(i)) for i in s] for s in randoms]
    out["real_metric"], out["real_metrics"] = real_metric(task), real_metrics(task)
    return out


def write(path: Path, args, tables) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"params": vars(args), "tasks": tables}, indent=2, default=float))


def print_table(tables, args) -> None:
    print(f"\n{args.model}: held-out real metric baseline -> ablated (relative drop); general accuracy; "
          f"top-{args.k}; cost of the locate")
    print("| task | run | top-5 | metric: baseline -> ablated (rel. drop) | ref_logprob drop (of p) | general acc | "
          "tokens | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row in tables.items():
        if "lacks_capability" in row:
            print(f"| {name} | - | - | {row['lacks_capability']['reason']} | - | - | - | - |")
            continue
        held = row.get("held_out")
        if not held or "runs" not in held:
            continue
        metrics = held.get("real_metrics", [held["real_metric"]])

        def real(m):
            return "; ".join(f"{metric} {m[metric]['baseline']:.3f} -> {m[metric]['ablated']:.3f} "
                             f"({m[metric]['relative_drop']:.0%})" for metric in metrics if metric in m)

        for label, m in held["runs"].items():
            run = row["runs"][label]
            ref = m.get("ref_logprob")
            print(f"| {name} | {label} | {','.join(run['top'])} | {real(m)} | "
                  f"{'-' if ref is None else format(ref['relative_drop'], '.0%')} | "
                  f"{m['general_acc']['baseline']:.3f} -> {m['general_acc']['ablated']:.3f} | {run['tokens']} | "
                  f"{run['locate_seconds']:.0f} |")
        if held["random_sets"]:
            r = held["random"]
            print(f"| {name} | random x{len(held['random_sets'])} | - | {real(r)} | - | "
                  f"{r['general_acc']['baseline']:.3f} -> {r['general_acc']['ablated']:.3f} | - | - |")
        for method, overlap in (row.get("overlap") or {}).items():
            print(f"| {name} | {method}: top-5 overlap across seeds | {overlap['pairwise']}, in every seed: "
                  f"{','.join(overlap['in_every_seed']) or 'none'} | | | | | |")


if __name__ == "__main__":
    main()
