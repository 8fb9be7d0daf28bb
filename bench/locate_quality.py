"""Quality of localization methods: do they find specific, reproducible heads, and at what cost?

For each task (arithmetic 2D+, induction, ioi), seed and method, `caploc.locate` identifies the top-k heads;
the benchmark then reports, per task and method:
- model tokens relative to iterative greedy's: masks requested on the identification items and on the
  control-identification items, each x its tokens per mask (shared prefixes once), plus the tokens a
  gradient screen runs (three passes per token: a few-shot prefix shared by the items once, other rows
  whole); a logical cost, the same whether or not the store already held the masks;
- held-out target drop (the identification metric, all k heads ablated) as % of greedy's, and the held-out
  accuracy drop (points);
- held-out `general` accuracy drop (points) of the same heads, on every general item that no seed's control
  sets (identification or validation) hold, and the relative drop of its answer log-probability;
- held-out `text` damage: the relative drop of the log-probability of 40 chunks of prose (language modelling);
- cross-seed top-k overlap (mean over seed pairs) and the mean bootstrap selection frequency of the top-k;
- induction: how many of the top-k are among the 10 highest prefix-matching heads (a non-ablation truth);
  induction and IOI: the same from locate's own attention check (IOI: attention from the last token to the
  indirect object, Wang et al.'s name movers).

Methods run as the paper defines them (no control: greedy, 1s-greedy, csb, css, atp), as caploc's
control-aware default (`refine`, control `general`), and the joint search (`joint`, controls `general` and
`text`; its default pool has no layer screen, `joint-layers2` adds the screen's two best layers (the recorded
rows labelled `joint --layers 2` ran as `joint` when that was its default), `joint-layers1` the best layer only,
`joint-keep5` the two pruned to 5 heads each, `joint-exact15` exact elimination from the whole pool), plus any
--extra refine variants and `refine-target2` (two candidates a round nominated by the target estimate alone);
`greedy+control` is iterative greedy under the default's criterion (refine over every head), run on
--greedy-seeds like greedy.
Percentages are of the paper's greedy. On IOI, every run also measures which heads take over when its set is
ablated (the backup name movers): the gradient on top of the set nominates 10 heads, and each one's exact
drop on top of the set is set against its drop alone.

Usage: python bench/locate_quality.py [--tasks arithmetic,induction,ioi] [--methods refine,joint,greedy]
       [--seeds 0,1,2] [--n 40] [--greedy-seeds 0] [--json bench/locate_quality_TASKS.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np

from caploc import Criterion, EvalOptions, LocateOptions, TaskSpec, load_model, locate, make_method
from caploc.evaluator import Evaluator
from caploc.methods import Objective
from caploc.stats import paired_drop
from caploc.store import EvalStore
from caploc.tasks import get_task

TASK_OPTIONS = {"arithmetic": {"subtask": "2D+"}, "induction": {}, "ioi": {}}
PAPER_METHODS = {"greedy": {}, "1s-greedy": {}, "csb": {"n_masks": 100, "sparsity": 0.05},
                 "css": {"n_masks": 100, "sparsity": 0.05}, "atp": {}}
# --methods names run under a control: (label, method, its parameters, control)
CONTROL_AWARE = {
    "refine": ("refine (default, control general)", "refine", {}, "general"),
    # the joint search, with prose as a second control (what early heads break); its default pool has no layer
    # screen (the recorded rows labelled "joint --layers 0" ran it before that was the default)
    "joint": ("joint (control general,text)", "joint", {}, "general,text"),
    "joint-layers0": ("joint --layers 0 (control general,text)", "joint", {"layers": 0}, "general,text"),
    # the layer screen's two best layers in the pool (joint's default until the layer challenge's polish)
    "joint-layers2": ("joint --layers 2 (control general,text)", "joint", {"layers": 2}, "general,text"),
    # the layer screen's best layer alone
    "joint-layers1": ("joint --layers 1 (control general,text)", "joint", {"layers": 1}, "general,text"),
    # the layer screen's layers each pruned to 5 heads before they join the pool
    "joint-keep5": ("joint --layer-keep 5 (control general,text)", "joint", {"layers": 2, "layer_keep": 5},
                    "general,text"),
    # exact elimination from the whole pool (up to 15 heads), no gradient pruning before it
    "joint-exact15": ("joint --exact-from 15 (control general,text)", "joint", {"exact_from": 15}, "general,text"),
    # refine with two candidates a round nominated by the target estimate alone
    "refine-target2": ("refine --target-candidates 2 (control general)", "refine", {"target_candidates": 2},
                       "general"),
    # greedy under the default's criterion: what refine restricts
    "greedy+control": ("greedy (control general)", "greedy", {}, "general"),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--tasks", default="arithmetic,induction,ioi")
    parser.add_argument("--methods", default="refine,csb,css,atp,1s-greedy,greedy,greedy+control")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--greedy-seeds", default="0", help="iterative greedy is the costliest reference")
    parser.add_argument("--n", type=int, default=40, help="identification items")
    parser.add_argument("--n-validate", type=int, default=40)
    parser.add_argument("--n-control", type=int, default=None, help="control identification items (locate's "
                        "default when not given)")
    parser.add_argument("--n-text", type=int, default=40, help="held-out prose chunks for the text damage")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--bootstrap", type=int, default=100)
    parser.add_argument("--extra", default="", help="refine variants, e.g. 'css:16,atp:24,atp:8:2' "
                        "(screen:candidates[:exchange passes])")
    parser.add_argument("--store", default="bench/locate_quality.sqlite")
    parser.add_argument("--json", default=None, help="default: bench/locate_quality_TASKS.json")
    args = parser.parse_args()
    args.json = args.json or f"bench/locate_quality_{args.tasks.replace(',', '-')}.json"

    lm = load_model(args.model, dtype=args.dtype)
    store = EvalStore(args.store)
    seeds = [int(s) for s in args.seeds.split(",")]
    greedy_seeds = [int(s) for s in args.greedy_seeds.split(",")]
    general = get_task("general")
    # every general item no seed's control sets use (identification and validation, as locate draws them)
    n_control = Criterion(n_control=args.n_control).n_control_items(args.n)
    used = set()
    for seed in set(seeds) | set(greedy_seeds):
        used |= {i.id for i in general.items(n_control, seed)}
        used |= {i.id for i in general.items(args.n_validate, seed, offset=n_control)}
    general_items = [i for i in general.pool(0, 10 ** 6) if i.id not in used]
    general_eval = Evaluator(lm, general, general_items, store=store)
    general_base = general_eval.baseline().scores["acc"][0]
    general_base_lp = general_eval.baseline().scores["logprob"][0]
    text = get_task("text")
    text_eval = Evaluator(lm, text, text.items(args.n_text, seed=0), store=store)  # no method's control here
    text_base = text_eval.baseline().scores["logprob"][0]
    print(f"held-out general items: {len(general_items)}; text chunks: {args.n_text}", flush=True)
    # (label, method, its parameters, control)
    configs = [CONTROL_AWARE.get(name) or (name, name, PAPER_METHODS[name], "none") for name in args.methods.split(",")]
    for variant in filter(None, args.extra.split(",")):
        screen, m, *passes = variant.split(":")
        passes = int(passes[0]) if passes else 0
        configs.append((f"refine {screen} M={m}{f' exchange {passes}' if passes else ''} (control general)",
                        "refine", dict(screen=screen, n_candidates=int(m), exchange_passes=passes), "general"))
    prefix_top10 = None
    rows, raw = [], {}
    for task_name in args.tasks.split(","):
        task = get_task(task_name, **TASK_OPTIONS.get(task_name, {}))
        per_config = {}
        for label, method, params, control in configs:
            runs = []
            for seed in (greedy_seeds if method == "greedy" else seeds):
                started = time.perf_counter()
                run = locate(lm, TaskSpec(task, n=args.n, n_validate=args.n_validate, seed=seed),
                             make_method(method, **params), k=args.k,
                             criterion=Criterion(control=control, n_control=args.n_control),
                             options=LocateOptions(bootstrap=args.bootstrap), evaluation=EvalOptions(store=store))
                top = run.top_heads(args.k)
                if task_name == "induction":  # locate's own check holds the 10 highest prefix-matching heads
                    prefix_top10 = set(run.attention_check["top"])
                heads = [[lm.layout.index(lm.layout.parse(h)) for h in top]]
                general_scores = general_eval.evaluate(heads)
                general_drop = paired_drop(general_base, general_scores.scores["acc"][0])
                # accuracy can hide damage (every choice's likelihood collapses alike): the answer's
                # log-probability shows it
                general_lp = paired_drop(general_base_lp, general_scores.scores["logprob"][0])
                text_drop = paired_drop(text_base, text_eval.evaluate(heads).scores["logprob"][0])
                metric = run.metric
                # logical cost, independent of what the store already held (locate's budget): masks asked
                # for x tokens per mask, target and control apart, plus the tokens the gradients ran
                per_mask = run.budget["tokens_per_evaluation"] or 0
                extra = {"backups": backups(lm, task, seed, heads[0], args.n, store, run.attention_check)} \
                    if task_name == "ioi" else {}
                runs.append({**extra, "seed": seed, "top": top, "tokens": run.budget["logical_model_tokens"],
                             "control_evaluations": run.budget["control_evaluations"],
                             "computed_tokens": run.budget["method_model_tokens"],
                             "evaluations": run.budget["evaluations"], "tokens_per_evaluation": per_mask,
                             "target_drop": run.validation[metric][-1]["drop"],
                             "target_baseline": run.validation[metric][-1]["baseline"],
                             "target_acc_drop": run.validation["acc"][-1]["drop"],
                             "target_acc_baseline": run.validation["acc"][-1]["baseline"],
                             "text_relative_drop": text_drop["relative_drop"],
                             "general_drop": general_drop["drop"], "general_drop_low": general_drop["drop_low"],
                             "general_drop_high": general_drop["drop_high"],
                             "general_logprob_drop": general_lp["drop"],
                             "general_logprob_relative_drop": general_lp["relative_drop"],
                             "frequency": run.stability.get("top_k_mean_frequency"),
                             # locate's own non-ablation check (induction: prefix matching; IOI: name movers)
                             "attention_in_top": (run.attention_check["reported_in_top"]
                                                  if run.attention_check else None),
                             # refine's exchange passes: the best swap each proposed, its support, whether kept
                             "exchanges": [{"proposed": [str(lm.layout.head(i)) for i in e["proposed"]],
                                            "support": e["support"], "kept": e["swap"] is not None}
                                           for e in (run.details or {}).get("exchanges", []) if "proposed" in e],
                             # the layer challenge (refine, joint): the set a layer narrowed to, its support
                             "layer_challenge": _challenge(lm, (run.details or {}).get("layer_challenge")),
                             "seconds": round(time.perf_counter() - started, 1)})
                print(f"{task_name} {label} seed {seed}: {top} target drop {runs[-1]['target_drop']:.3f} "
                      f"general drop {100 * general_drop['drop']:.1f} pts, {runs[-1]['tokens']} tokens, "
                      f"{runs[-1]['seconds']} s", flush=True)
            per_config[label] = runs
            raw[task_name] = per_config
            write(args.json, rows, raw, vars(args), prefix_top10)  # a killed run keeps what it measured
        raw[task_name] = per_config
        greedy = per_config.get("greedy")
        for label, runs in per_config.items():
            tops = [set(r["top"]) for r in runs]
            overlap = (np.mean([len(a & b) for a, b in itertools.combinations(tops, 2)])
                       if len(tops) > 1 else None)
            row = {"task": task_name, "method": label, "seeds": len(runs),
                   "tokens": float(np.mean([r["tokens"] for r in runs])),
                   "target_drop": float(np.mean([r["target_drop"] for r in runs])),
                   "target_acc_drop_pts": 100 * float(np.mean([r["target_acc_drop"] for r in runs])),
                   "general_drop_pts": 100 * float(np.mean([r["general_drop"] for r in runs])),
                   "general_logprob_relative_drop": float(np.mean([r["general_logprob_relative_drop"]
                                                                   for r in runs])),
                   "text_relative_drop": float(np.mean([r["text_relative_drop"] for r in runs])),
                   "cross_seed_overlap": overlap,
                   "frequency": (float(np.mean([r["frequency"] for r in runs]))
                                 if runs[0]["frequency"] is not None else None)}
            if greedy:
                row["tokens_vs_greedy"] = row["tokens"] / np.mean([r["tokens"] for r in greedy])
                row["target_drop_pct_greedy"] = 100 * row["target_drop"] / np.mean([r["target_drop"] for r in greedy])
                row["general_drop_minus_greedy_pts"] = row["general_drop_pts"] - 100 * np.mean(
                    [r["general_drop"] for r in greedy])
            if task_name == "induction" and prefix_top10:
                row["in_prefix_top10"] = float(np.mean([len(set(r["top"]) & prefix_top10) for r in runs]))
            if runs[0]["attention_in_top"] is not None:
                row["in_attention_top10"] = float(np.mean([len(r["attention_in_top"]) for r in runs]))
            rows.append(row)
        write(args.json, rows, raw, vars(args), prefix_top10)
    print_table(rows, args.k)


def _challenge(lm, record):
    if not record or not record.get("proposed"):
        return None
    return {"proposed": [str(lm.layout.head(i)) for i in record["proposed"]], "support": record["support"],
            "kept": record["set"] is not None}


def backups(lm, task, seed, chosen, n, store, check, candidates=10, report=5):
    """Which heads take over when the set `chosen` is ablated (IOI's backup name movers): the gradient on top
    of the set nominates `candidates` heads, and each one's exact marginal drop on top of the set, against its
    drop alone, is measured; the `report` largest, with whether they are among the heads that attend most to
    the indirect object."""
    objective = Objective(Evaluator(lm, task, task.items(n, seed), store=store), task.identification_metric)
    estimate, _ = objective.estimated_drops(chosen)
    nominated = [int(i) for i in np.argsort(-estimate) if int(i) not in chosen][:candidates]
    on_top = objective.drops(objective.set_masks([chosen + [h] for h in nominated] + [chosen]))
    alone = objective.drops(objective.set_masks([[h] for h in nominated]))
    marginal = on_top[:-1] - on_top[-1]
    order = np.argsort(-marginal)[:report]
    movers = set(check.get("top", [])) if check else set()
    return [{"head": str(lm.layout.head(nominated[j])), "marginal_on_top": float(marginal[j]),
             "alone": float(alone[j]), "name_mover_top10": str(lm.layout.head(nominated[j])) in movers}
            for j in order]


def write(path, rows, raw, params, prefix_top10):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"params": params, "rows": rows, "runs": raw,
                                      "prefix_matching_top10": sorted(prefix_top10 or [])}, indent=2,
                                     default=float))


def print_table(rows, k):
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    print(f"| task | method | seeds | tokens / greedy's | held-out target drop (% greedy) | target acc drop (pts) | "
          f"held-out general drop: acc pts (- greedy's) / logprob | text damage | cross-seed top-{k} overlap | "
          f"mean selection frequency | induction: in prefix top-10 | in attention top-10 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['method']} | {r['seeds']} | {fmt(r.get('tokens_vs_greedy'), '.3f')} | "
              f"{r['target_drop']:.2f} ({fmt(r.get('target_drop_pct_greedy'), '.0f')}%) | "
              f"{r['target_acc_drop_pts']:.1f} | "
              f"{r['general_drop_pts']:.1f} ({fmt(r.get('general_drop_minus_greedy_pts'), '+.1f')}) / "
              f"{100 * r['general_logprob_relative_drop']:.0f}% | {100 * r['text_relative_drop']:.1f}% | "
              f"{fmt(r['cross_seed_overlap'], '.1f')} | {fmt(r['frequency'], '.2f')} | "
              f"{fmt(r.get('in_prefix_top10'), '.1f')} | {fmt(r.get('in_attention_top10'), '.1f')} |")


if __name__ == "__main__":
    main()
