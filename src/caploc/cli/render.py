"""Tables for people, one renderer per result type; JSON for programs."""

from __future__ import annotations

import json
import sys
from typing import Callable, Optional

from rich.console import Console
from rich.table import Table

from caploc.components import HeadLayout
from caploc.files import json_default, write_json
from caploc.stats import LOG_PROBABILITIES

console = Console(width=None if sys.stdout.isatty() else 160)


def emit(report, as_json: bool, json_file: Optional[str], show: Callable) -> None:
    """Tables for people, or the whole result as JSON for programs; optionally also a JSON file."""
    if json_file:
        write_json(json_file, report.to_dict())
    if as_json:
        print(json.dumps(report.to_dict(), indent=2, default=json_default))
    else:
        show(report)


def _share(point: dict, metric: str | None) -> str:
    """A relative drop; of a log-probability it is the share of the answer's probability removed ("of p")."""
    return f"{point['relative_drop']:.1%}" + (" of p" if metric in LOG_PROBABILITIES else "")


def _fmt_interval(mean: float, lo: float, hi: float) -> str:
    return f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"


def print_eval(report) -> None:
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
                    _fmt_interval(m["drop"], m["drop_low"], m["drop_high"]), _share(m, name)]
        else:
            row += ["-", "-", "-"]
        table.add_row(*row)
    console.print(table)
    b = report["budget"]
    console.print(f"{b['evaluations']} evaluations, {b['tokens']} tokens, {b['seconds']:.1f} s")
    print_warnings(report)


def print_warnings(report) -> None:
    for line in report.get("warnings") or []:
        console.print(f"[yellow]warning: {line}[/yellow]")


def print_locate(report) -> None:
    m = report["method"]
    console.print(f"[bold]{m['name']}[/bold] on {report['task']['task']} ({report['model']['spec']}): "
                  f"{report['n']} identification items, {report['n_validate']} held-out, metric {report['metric']}, "
                  f"seed {report['seed']}")
    control = report.get("control") or {}
    if control.get("tasks"):
        console.print(f"control: {', '.join(t['task'] for t in control['tasks'])} ({control['n']} items, "
                      f"{', '.join(control['metrics'])}), penalty {control['penalty']}")
    effects = report.get("head_effects") or {}
    extra = [c for c in ("selection_frequency", "seed_frequency") if report["heads"] and c in report["heads"][0]]
    # greedy-style methods: what each chosen head added to the target drop in its round (on top of the heads
    # chosen before it) - for heads the screen only estimated alone, the measured number
    rounds = (report.get("details") or {}).get("rounds") or []
    added, before = {}, 0.0
    for r in rounds:
        added[r["head"]] = r["cumulative_drop"] - before
        before = r["cumulative_drop"]
    table = Table(title=f"top-{report['k']} heads ({report['score_name']})")
    columns = ["rank", "head", "score", "target effect", "control effect"] + (["added drop"] if added else [])
    for col in columns + ["KV group"] + [c.replace("_", " ") for c in extra]:
        table.add_column(col)
    for h in report["heads"]:
        row = [str(h["rank"]), h["head"], f"{h['score']:.4f}" if h["score"] == h["score"] else "-"]
        for kind in ("target", "control"):
            values = effects.get(kind)
            row.append(f"{values[h['index']]:.4f}" if values and values[h["index"]] == values[h["index"]] else "-")
        if added:
            row.append(f"{added[h['index']]:.4f}" if h["index"] in added else "-")
        table.add_row(*row, str(h["kv_group"]), *[f"{h[c]:.0%}" for c in extra])
    console.print(table)
    layout = HeadLayout(n_layers=report["model"]["n_layers"], n_heads=report["model"]["n_heads"])
    challenge = (report.get("details") or {}).get("layer_challenge")
    if challenge and challenge.get("proposed"):
        heads = ", ".join(str(layout.head(i)) for i in challenge["proposed"])
        polished = [p["swap"] for p in challenge.get("polish") or [] if p.get("swap")]
        how = "a layer's heads eliminated down to k" + "".join(
            f", then {layout.head(out)} -> {layout.head(into)}" for out, into in polished)
        console.print(f"layer challenge: {heads} ({how}), criterion "
                      f"{challenge['criterion_before']:.4f} -> {challenge['proposed_criterion']:.4f}, higher in "
                      f"{challenge['support']:.0%} of item resamples: {'kept' if challenge.get('set') else 'not kept'}")
    for swap in (report.get("details") or {}).get("exchanges") or []:
        if swap.get("proposed"):
            out, into = (str(layout.head(i)) for i in swap["proposed"])
            kept = "kept" if swap.get("swap") else "not kept"
            console.print(f"exchange: {out} -> {into}, criterion {swap['criterion_before']:.4f}"
                          + (f" -> {swap['criterion']:.4f}" if swap.get("swap") else "")
                          + f", higher in {swap['support']:.0%} of item resamples: {kept}")
    check = report.get("attention_check") or {}
    if check:
        found = check["reported_in_top"]
        console.print(f"attention check ({check['score'].replace('_', ' ')}, {check['source']}): {len(found)} of the "
                      f"top-{len(check['reported_scores'])} among the {len(check['top'])} highest heads"
                      + (f" ({', '.join(found)})" if found else "") + f"; those are {', '.join(check['top'])}")
    stability = report.get("stability") or {}
    if stability.get("top_k_per_seed"):
        console.print(f"seeds {stability['seeds']}: top-{report['k']} per seed "
                      + "; ".join(",".join(t) for t in stability["top_k_per_seed"])
                      + f"; mean pairwise overlap {stability['mean_pairwise_overlap']:.1f} of {report['k']}")
    if stability.get("cross_seed"):
        console.print(_cross_seed_table(stability["seeds"], stability["cross_seed"]))
    curve = Table(title="drop on held-out items when ablating the top-j heads (paired 95% CI)")
    curve.add_column("j")
    metrics = list(report["validation"])
    for name in metrics:
        curve.add_column(f"{name} drop")
        curve.add_column(f"{name} rel.")
    for j in range(1, report["k"] + 1):
        row = [str(j)]
        for name in metrics:  # a metric by generation is measured with all k heads ablated only
            point = next((p for p in report["validation"][name] if p.get("k", j) == j), None)
            row += ([_fmt_interval(point["drop"], point["drop_low"], point["drop_high"]),
                     _share(point, name)] if point else ["-", "-"])
        curve.add_row(*row)
    console.print(curve)
    base = report["validation"][metrics[0]][0]
    console.print(f"held-out baseline {metrics[0]} {base['baseline']:.4f}")
    for name, curves in (report.get("control_validation") or {}).items():
        console.print(f"control {name}, held-out, all {report['k']} heads ablated: " + ", ".join(
            f"{m} {c[-1]['baseline']:.3f} -> {c[-1]['ablated']:.3f} ({_share(c[-1], m)})"
            for m, c in curves.items() if m in ("acc", "acc_norm", "logprob")))
    if report.get("details", {}).get("warning"):
        console.print(f"[yellow]warning: {report['details']['warning']}[/yellow]")
    print_warnings(report)
    b = report["budget"]
    console.print(f"budget: {b['evaluations']} method evaluations ({b['computed_evaluations']} computed, "
                  f"{b['reused_evaluations']} reused from the store), {b['model_tokens']} model tokens, "
                  f"{b['wall_seconds']:.1f} s")


def print_heads(info) -> None:
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
    for key, what in (("prefix_matching", "prefix-matching (induction heads)"),
                      ("previous_token", "previous-token (the heads induction heads read)"),
                      ("name_mover", "attention to the indirect object (IOI name movers)"),
                      ("subject", "attention to the IOI subject")):
        scored = [h for h in info["heads"] if key in h]
        if scored:
            top = sorted(scored, key=lambda h: -h[key])[:10]
            console.print(f"highest {what} scores: " + ", ".join(f"{h['head']} {h[key]:.2f}" for h in top))


def print_specificity(report) -> None:
    table = Table(title=f"ablating {','.join(report['heads'])} on {report['model']['spec']} "
                        f"({report['n']} items per task, seed {report['seed']}, {report['mode']} ablation)")
    for col in ("task", "metric", "baseline [95% CI]", "ablated [95% CI]", "drop [paired 95% CI]", "relative drop"):
        table.add_column(col)
    for name, r in report["tasks"].items():
        table.add_row(name, r["metric"], _fmt_interval(r["baseline"], r["baseline_low"], r["baseline_high"]),
                      _fmt_interval(r["ablated"], r["ablated_low"], r["ablated_high"]),
                      _fmt_interval(r["drop"], r["drop_low"], r["drop_high"]), _share(r, r["metric"]))
    g = report["general"]
    if g:
        table.add_row("general average", "", f"{g['baseline']:.3f}", f"{g['ablated']:.3f}",
                      f"{g['baseline'] - g['ablated']:.3f}", f"{g['relative_drop']:.1%}", style="bold")
    console.print(table)
    console.print(f"{report['wall_seconds']:.1f} s")


def print_universal(report, top: int) -> None:
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


def print_compare(report) -> None:
    table = Table(title="top heads of two runs")
    for path, task, heads in zip(report["runs"], report["tasks"], report["heads"]):
        table.add_column(f"{task} ({path})")
    for a, b in zip(*[h + [""] * (max(map(len, report["heads"])) - len(h)) for h in report["heads"]]):
        shared = set(report["shared"])
        table.add_row(f"[bold]{a}[/bold]" if a in shared else a, f"[bold]{b}[/bold]" if b in shared else b)
    console.print(table)
    spearman = (f"{report['spearman']:.3f} over the {report['spearman_heads']} heads both scored"
                if report["spearman"] is not None else "n/a")
    console.print(f"overlap {report['overlap']} (shared: {', '.join(report['shared']) or 'none'}), "
                  f"Jaccard {report['jaccard']:.2f}, Spearman of per-head scores {spearman}")
    if report.get("note"):
        console.print(report["note"])


def print_report(written) -> None:
    console.print(f"wrote {written['html']}")
    for name, path in written["figures"].items():
        console.print(f"  {name}: {path}")


def print_neurons(report) -> None:
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
                      _fmt_interval(loc["drop"], loc["drop_low"], loc["drop_high"]), _share(loc, r["metric"]),
                      _fmt_interval(rnd["drop"], rnd["drop_low"], rnd["drop_high"]), _share(rnd, r["metric"]))
    console.print(table)
    for e in report["enhancement"]:
        console.print(f"enhancement x{e['factor']} (split B): " + ", ".join(
            f"{m} {v['baseline']:.3f} -> {v['ablated']:.3f} (random neurons: {e['random_metrics'][m]['ablated']:.3f})"
            for m, v in e["metrics"].items()))
    console.print(f"{report['wall_seconds']:.1f} s")


def print_density(report, top: int) -> None:
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


def print_compress(report) -> None:
    keys = [k for k in report["rows"][0] if k not in ("allocation", "removed", "per_layer", "heads")]
    table = Table(title=f"removing {report['target']:.0%} of the heads of {report['model']['spec']}")
    for col in ["allocation", "heads removed"] + keys:
        table.add_column(col)
    for row in report["rows"]:
        table.add_row(row["allocation"], str(row["removed"]), *[f"{row[k]:.4f}" for k in keys])
    console.print(table)
    console.print(f"Spearman(density, Wanda) = {report['spearman_density_wanda']:.3f}; {report['wall_seconds']:.1f} s")


def print_export(written) -> None:
    console.print(f"wrote {written['out']}: {written['model']['spec']} without {', '.join(written['removed_heads'])}")



def print_doctor(report) -> None:
    console.print(f"caploc runs as {report['running_as']}; sandboxed code {report['drops_to']}")
    layers = ("pid_namespace", "network_namespace", "filesystem_read_only", "seccomp", "no_new_privs",
              "capabilities_dropped")
    table = Table(title="sandbox layers seen by a probe inside each isolation mechanism")
    table.add_column("mechanism")
    for layer in ("available",) + layers:
        table.add_column(layer.replace("_", " "))
    for name, seen in report["mechanisms"].items():
        table.add_row(name, *["yes" if seen.get(layer) else "no" for layer in ("available",) + layers])
    console.print(table)
    if report["in_use"]:
        console.print(f"in use: {report['in_use']}")
    else:
        console.print(f"[red]model-written code is refused: {report['refusal']}[/red]")


def print_registry(kind: str, registry) -> None:
    """What is registered: one row per name, with its parameters and the flags that set them."""
    table = Table(title=f"registered {kind}s")
    for col in (kind, "what it is", "parameters"):
        table.add_column(col)
    for name, entry in registry.items():
        flag = (lambda p: p.flag) if kind == "method" else (lambda p: f"--task-arg {p.name}=")
        params = ", ".join(f"{flag(p)} ({p.default!r})" if not p.required else flag(p)
                           for p in entry.params if p.name != "seed")
        what = entry.summary
        if kind == "task":
            what = f"[{entry.cls.kind}] " + (what or entry.cls.__name__)
        table.add_row(name, what, params or "-")
    console.print(table)


def _cross_seed_table(seeds: list[int], cross: dict) -> Table:
    """Each seed's set (columns) under each seed's criterion (rows), with how often it beats that seed's own."""
    table = Table(title=f"each seed's set scored on each seed's items (criterion; share of {cross['resamples']} "
                        f"item resamples in which it beats that seed's own set)")
    table.add_column("items of")
    for seed in seeds:
        table.add_column(f"seed {seed}'s set" + (" (best)" if seed == cross["best_seed"] else ""))
    for seed, values, wins in zip(seeds, cross["criterion"], cross["beats_own"]):
        table.add_row(f"seed {seed}", *(f"{v:.3f}" + ("" if w is None else f" ({w:.0%})") for v, w in zip(values, wins)))
    table.add_row("mean", *(f"{m:.3f}" for m in cross["mean_criterion"]))
    return table
