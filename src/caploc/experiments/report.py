"""A report a person reads: PNG figures and one self-contained HTML page (images embedded) per run directory.

Figures: the layers x heads heatmap of head scores (top-k boxed, universal heads marked), the drop-vs-k
curve on held-out items with paired 95% intervals (the paper's Figure 2), and, when the run directory
holds them, specificity bars (the capability's task vs general-capability tasks).
"""

from __future__ import annotations

import base64
import html
import json
import webbrowser
from pathlib import Path

import numpy as np

from caploc.components import Head
from caploc.errors import CaplocError
from caploc.experiments.results import LocateResult, ReportResult, SpecificityResult, UniversalResult
from caploc.files import atomic_write
from caploc.tasks import GENERAL_TASKS

HEATMAP, CURVE, SPECIFICITY_PNG, PAGE = "heatmap.png", "drop_curve.png", "specificity.png", "report.html"
EFFECTS = "effects.png"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def plot_heatmap(run: dict, path: Path, universal: list[str] | None = None) -> Path:
    plt = _pyplot()
    model = run["model"]
    n_layers, n_heads = model["n_layers"], model["n_heads"]
    scores = np.asarray(run["head_scores"], dtype=float).reshape(n_layers, n_heads)
    limit = float(np.abs(scores).max()) or 1.0
    fig, ax = plt.subplots(figsize=(max(4.5, 0.45 * n_heads + 2.5), max(4, 0.22 * n_layers + 1.5)))
    image = ax.imshow(scores, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", origin="lower")
    bar = fig.colorbar(image, ax=ax)
    bar.set_label(f"head score: {run.get('score_name', 'score')} ({run.get('metric', '')})")
    for rank, entry in enumerate(run["heads"], 1):
        h = Head.parse(entry["head"])
        ax.add_patch(plt.Rectangle((h.head - 0.5, h.layer - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2))
        ax.text(h.head, h.layer, str(rank), ha="center", va="center", fontsize=7, fontweight="bold")
    for name in universal or []:
        h = Head.parse(name)
        ax.plot(h.head, h.layer, marker="x", color="black", markersize=8, markeredgewidth=1.5)
    ax.set_xlabel("head (query-head index within the layer)")
    ax.set_ylabel("layer")
    ax.set_xticks(range(n_heads))
    ax.set_yticks(range(0, n_layers, max(1, n_layers // 15)))
    title = f"{run['task']['task']}: head scores, {run['method']['name']} on {model['spec']}"
    subtitle = f"boxes: top-{len(run['heads'])} (rank inside)" + ("; x: universal heads" if universal else "")
    ax.set_title(f"{title}\n{subtitle}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_drop_curve(run: dict, path: Path) -> Path:
    plt = _pyplot()
    metrics = [m for m in ("acc", "logprob", "acc_norm", "pass@1") if m in run["validation"]] or list(run["validation"])
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.8 * len(metrics), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for split, style in (("validation", "-o"), ("identification", "--s")):
            points = run.get(split, {}).get(metric)
            if not points:
                continue
            k = [p["k"] for p in points]
            drop = np.array([p["drop"] for p in points])
            err = np.array([[p["drop"] - p["drop_low"] for p in points], [p["drop_high"] - p["drop"] for p in points]])
            label = f"held-out ({run['n_validate']} items)" if split == "validation" else f"identification ({run['n']})"
            ax.errorbar(k, drop, yerr=err, fmt=style, capsize=3, label=label)
        base = run["validation"][metric][0]["baseline"]
        ax.axhline(0, color="gray", linewidth=0.8)
        unit = "log-probability of the answer (nats)" if metric.startswith("logprob") else f"{metric} (fraction)"
        ax.set_xlabel("number of top heads ablated (k)")
        ax.set_ylabel(f"drop in {unit}")
        ax.set_title(f"{metric}: drop vs k (baseline {base:.3f}), paired 95% CI", fontsize=10)
        ax.set_xticks(range(1, run["k"] + 1))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_effects(run: dict, path: Path) -> Path:
    """Per head, the target effect and the control effect as layers x heads heatmaps, and one against the
    other with the chosen heads marked: specific heads sit far right and low."""
    plt = _pyplot()
    model = run["model"]
    n_layers, n_heads = model["n_layers"], model["n_heads"]
    effects = run["head_effects"]
    target = np.asarray(effects["target"], dtype=float)
    control = np.asarray(effects["control"], dtype=float)
    chosen = [Head.parse(h["head"]) for h in run["heads"]]
    fig, axes = plt.subplots(1, 3, figsize=(max(13, 3 * (0.45 * n_heads + 2.5)), max(4.2, 0.22 * n_layers + 1.5)))
    for ax, values, label in ((axes[0], target, f"target: {effects['target_units']}"),
                              (axes[1], control, f"control: {effects['control_units']}")):
        grid = values.reshape(n_layers, n_heads)
        limit = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
        image = ax.imshow(np.ma.masked_invalid(grid), cmap="RdBu_r", vmin=-(limit or 1), vmax=limit or 1,
                          aspect="auto", origin="lower")
        fig.colorbar(image, ax=ax).set_label(label, fontsize=8)
        for rank, h in enumerate(chosen, 1):
            ax.add_patch(plt.Rectangle((h.head - 0.5, h.layer - 0.5), 1, 1, fill=False, edgecolor="black",
                                       linewidth=2))
            ax.text(h.head, h.layer, str(rank), ha="center", va="center", fontsize=7, fontweight="bold")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(label.split(":")[0] + " effect per head (blank: not measured)", fontsize=9)
    ax = axes[2]
    finite = np.isfinite(target) & np.isfinite(control)
    ax.scatter(target[finite], control[finite], s=10, color="gray", alpha=0.6, label="heads")
    idx = [h.layer * n_heads + h.head for h in chosen]
    ax.scatter(target[idx], control[idx], s=40, color="tab:red", label="chosen")
    for h, i in zip(chosen, idx):
        ax.annotate(str(h), (target[i], control[i]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_xlabel(f"target effect ({effects['target_units']})")
    ax.set_ylabel(f"control effect ({effects['control_units']})")
    ax.set_title("target vs control effect", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_specificity(spec: dict, capability: str | None, path: Path) -> Path:
    plt = _pyplot()
    names = list(spec["tasks"])
    rel = [100 * spec["tasks"][n]["relative_drop"] for n in names]
    lows, highs = [], []
    for n in names:
        r = spec["tasks"][n]
        base = abs(r["baseline"]) or 1.0
        lows.append(100 * (r["drop"] - r["drop_low"]) / base)
        highs.append(100 * (r["drop_high"] - r["drop"]) / base)
    colors = ["tab:red" if n == capability else ("tab:blue" if n in GENERAL_TASKS else "tab:gray") for n in names]
    if spec.get("general"):
        names.append("general average")
        rel.append(100 * spec["general"]["relative_drop"])
        lows.append(0)
        highs.append(0)
        colors.append("navy")
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(names) + 2), 4))
    undefined = [i for i, v in enumerate(rel) if not np.isfinite(v)]  # a zero baseline has no relative drop
    rel = [0.0 if not np.isfinite(v) else v for v in rel]
    lows = [0.0 if not np.isfinite(v) else v for v in lows]
    highs = [0.0 if not np.isfinite(v) else v for v in highs]
    ax.bar(range(len(names)), rel, yerr=[lows, highs], color=colors, capsize=4)
    for i in undefined:
        ax.text(i, 0, "baseline 0:\nno relative drop", ha="center", va="bottom", fontsize=7, color="dimgray")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([f"{n}\n({spec['tasks'][n]['metric']})" if n in spec["tasks"] else n for n in names],
                       fontsize=8)
    ax.set_ylabel("relative drop when ablated (% of baseline)")
    ax.set_title(f"specificity of {','.join(spec['heads'])}\nred: the run's task, blue: general capability, "
                 f"gray: other tasks", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _table(rows: list[tuple], header: tuple | None = None) -> str:
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>")
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def _fmt(x) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def report(run_dir: str | Path, out: str | Path | None = None, universal_path: str | Path | None = None,
           open_browser: bool = False) -> ReportResult:
    """Write heatmap.png, drop_curve.png (and specificity.png) plus report.html into `out` (default: the run
    directory). Specificity and universal results are picked up from the run directory when present."""
    located = LocateResult.load(run_dir)
    for key in ("head_scores", "validation", "method", "task"):
        if not located[key]:
            raise CaplocError(f"{located.path} lacks {key!r}: not a complete locate result")
    run = located.to_dict()
    run_path = located.path.parent
    target = Path(out) if out else run_path
    target.mkdir(parents=True, exist_ok=True)
    spec_file = run_path / SpecificityResult.filename
    spec = SpecificityResult.load(spec_file).to_dict() if spec_file.exists() else None
    uni_file = Path(universal_path) if universal_path else run_path / UniversalResult.filename
    universal = UniversalResult.load(uni_file).to_dict() if (universal_path or uni_file.exists()) else None
    if uni_file.is_dir():
        uni_file = uni_file / UniversalResult.filename
    universal_heads = universal.get("universal_heads", []) if universal else []

    figures = {"heatmap": plot_heatmap(run, target / HEATMAP, universal_heads),
               "drop_curve": plot_drop_curve(run, target / CURVE)}
    if spec:
        figures["specificity"] = plot_specificity(spec, run["task"]["task"], target / SPECIFICITY_PNG)
    effects = run.get("head_effects") or {}
    if effects.get("target") and effects.get("control"):
        figures["effects"] = plot_effects(run, target / EFFECTS)

    model, budget, method = run["model"], run.get("budget", {}), run["method"]
    heads_rows = [(h["rank"], h["head"], f"{h['score']:.4f}", h.get("kv_group", ""),
                   f"{h['selection_frequency']:.0%}" if "selection_frequency" in h else "-",
                   f"{h['seed_frequency']:.0%}" if "seed_frequency" in h else "-") for h in run["heads"]]
    curve_rows = []
    for metric, points in run["validation"].items():
        for p in points:
            curve_rows.append((metric, p["k"], f"{p['baseline']:.4f}", f"{p['ablated']:.4f}",
                               f"{p['drop']:.4f} [{p['drop_low']:.4f}, {p['drop_high']:.4f}]",
                               f"{100 * p['relative_drop']:.1f}%"))
    params = [("model", f"{model['spec']} ({model.get('architecture')}, {model.get('dtype')}, "
                        f"{model['n_layers']} layers x {model['n_heads']} heads)"),
              ("task", json.dumps(run["task"])), ("method", json.dumps(method)),
              ("identification metric", run.get("metric")), ("k", run["k"]),
              ("identification items", run["n"]), ("held-out items", run["n_validate"]), ("seed", run["seed"]),
              ("ablation", run.get("mode")), ("excluded heads", ", ".join(run.get("excluded_heads", [])) or "none"),
              ("model fingerprint", run.get("fingerprints", {}).get("model")),
              ("identification items fingerprint", run.get("fingerprints", {}).get("identification_items")),
              ("held-out items fingerprint", run.get("fingerprints", {}).get("validation_items"))]
    budget_rows = [(k.replace("_", " "), _fmt(v)) for k, v in budget.items()]
    sections = [
        f"<h1>caploc: {html.escape(run['task']['task'])} heads of {html.escape(model['spec'])}</h1>",
        f"<p>Top-{run['k']} heads by <b>{html.escape(method['name'])}</b>: "
        f"<b>{html.escape(', '.join(h['head'] for h in run['heads']))}</b>. "
        f"Held-out drop when all are ablated: "
        + "; ".join(f"{m} {pts[-1]['drop']:.3f} [{pts[-1]['drop_low']:.3f}, {pts[-1]['drop_high']:.3f}] "
                    f"({100 * pts[-1]['relative_drop']:.0f}%)" for m, pts in run["validation"].items()) + ".</p>",
        _img(figures["heatmap"], "Head scores over layers x heads; the top-k heads are boxed with their rank"),
        _img(figures["drop_curve"], "Drop on held-out items when ablating the top-1..top-k heads (paired 95% CI)"),
        "<h2>Top heads</h2>", _table(heads_rows, ("rank", "head", "score", "KV group", "selection frequency",
                                                  "seed frequency")),
        "<h2>Drop curve (held-out)</h2>",
        _table(curve_rows, ("metric", "k", "baseline", "ablated", "drop [95% CI]", "relative drop")),
    ]
    if spec:
        spec_rows = [(name, r["metric"], f"{r['baseline']:.4f}", f"{r['ablated']:.4f}",
                      f"{r['drop']:.4f} [{r['drop_low']:.4f}, {r['drop_high']:.4f}]", f"{100 * r['relative_drop']:.1f}%")
                     for name, r in spec["tasks"].items()]
        if spec.get("general"):
            g = spec["general"]
            spec_rows.append(("general average", "", f"{g['baseline']:.4f}", f"{g['ablated']:.4f}",
                              f"{g['baseline'] - g['ablated']:.4f}", f"{100 * g['relative_drop']:.1f}%"))
        sections += ["<h2>Specificity</h2>",
                     _img(figures["specificity"], "Relative drop per task when the heads are ablated"),
                     _table(spec_rows, ("task", "metric", "baseline", "ablated", "drop [95% CI]", "relative drop"))]
    if "effects" in figures:
        control = run.get("control") or {}
        sections += ["<h2>Target and control effects</h2>",
                     f"<p>Control: {html.escape(', '.join(t['task'] for t in control.get('tasks', [])))}; "
                     f"criterion {html.escape(str(control.get('criterion')))}, penalty {control.get('penalty')}.</p>",
                     _img(figures["effects"], "Per-head target and control effects, and one against the other "
                                              "(chosen heads in red)")]
        control_rows = [(name, m, f"{c[-1]['baseline']:.4f}", f"{c[-1]['ablated']:.4f}",
                         f"{c[-1]['drop']:.4f} [{c[-1]['drop_low']:.4f}, {c[-1]['drop_high']:.4f}]",
                         f"{100 * c[-1]['relative_drop']:.1f}%")
                        for name, curves in (run.get("control_validation") or {}).items() for m, c in curves.items()]
        if control_rows:
            sections += ["<h3>Control, held-out, all k heads ablated</h3>",
                         _table(control_rows, ("task", "metric", "baseline", "ablated", "drop [95% CI]", "relative"))]
    stability = run.get("stability") or {}
    if stability:
        lines = []
        if "top_k_mean_frequency" in stability:
            lines.append(f"{stability['bootstrap']} bootstrap resamples of the identification items: mean selection "
                         f"frequency of the top-{run['k']} {100 * stability['top_k_mean_frequency']:.0f}%.")
        if stability.get("top_k_per_seed"):
            lines.append(f"Seeds {stability['seeds']}: " + "; ".join(", ".join(t) for t in stability["top_k_per_seed"])
                         + f" (mean pairwise overlap {stability['mean_pairwise_overlap']:.1f} of {run['k']}).")
        cross = stability.get("cross_seed")
        if cross:
            lines.append(f"Scored on every seed's items, seed {cross['best_seed']}'s set has the highest mean "
                         f"criterion ({max(cross['mean_criterion']):.3f})" + "".join(
                             f"; seed {m['seed']}'s search stopped short (seed {m['better_seed']}'s set beats its "
                             f"own on its items in {m['support']:.0%} of {cross['resamples']} resamples)"
                             for m in cross["search_stopped_short"]) + ".")
        sections += ["<h2>Stability</h2>", "<p>" + html.escape(" ".join(lines)) + "</p>"]
    if universal:
        sections += ["<h2>Universal heads</h2>",
                     f"<p>From {html.escape(str(uni_file))}: heads degrading at least {universal['min_tasks']} "
                     f"of {len(universal['metrics'])} tasks by {100 * universal['threshold']:.0f}% or more "
                     f"(marked x on the heatmap): {html.escape(', '.join(universal_heads) or 'none')}.</p>"]
    sections += ["<h2>Parameters and fingerprints</h2>", _table(params), "<h2>Budget</h2>", _table(budget_rows)]
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;"
             "font-size:13px;text-align:left}th{background:#f3f3f3}img{max-width:100%}figure{margin:1em 0}"
             "figcaption{font-size:13px;color:#555}")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>caploc report: "
            f"{html.escape(run['task']['task'])}</title><style>{style}</style></head><body>"
            + "\n".join(sections) + "</body></html>")
    page_path = target / PAGE
    atomic_write(page_path, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    if open_browser:
        webbrowser.open(page_path.resolve().as_uri())
    return ReportResult(html=str(page_path), figures={k: str(v) for k, v in figures.items()},
                        specificity=spec is not None, universal_heads=universal_heads)
