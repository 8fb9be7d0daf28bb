"""Budget vs quality of localization methods on the embedded model (arithmetic).

Exhaustive references first — one-shot greedy over all heads, and iterative greedy for k=5 (its first
round is the one-shot sweep, shared through the evaluation store) — then CSB and CSS at several
budgets. One table: method, evaluations, model tokens, wall time, overlap of its top-5 with greedy's
top-5, and its top-5 drop (on held-out items) as a fraction of greedy's top-5 drop.

Usage: python bench/locate_budget.py [--n 30] [--dtype bfloat16] [--budgets 25,50,100,200]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


from caploc import load_model
from caploc.evaluator import Evaluator
from caploc.methods import CompressedSensing, Greedy, Objective, OneShotGreedy
from caploc.stats import paired_drop
from caploc.store import EvalStore
from caploc.tasks import get_task


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--subtask", default="2D+")
    parser.add_argument("--n", type=int, default=30)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--metric", default="logprob")
    parser.add_argument("--budgets", default="25,50,100,200")
    parser.add_argument("--sparsities", default="0.02,0.05")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--store", default="bench/locate_budget.sqlite")
    parser.add_argument("--json", default="bench/locate_budget.json")
    parser.add_argument("--no-iterative", action="store_true",
                        help="skip iterative greedy (about 5x one-shot's cost); compare against one-shot greedy")
    args = parser.parse_args()

    lm = load_model(args.model, dtype=args.dtype)
    task = get_task("arithmetic", subtask=args.subtask)
    store = EvalStore(args.store)
    held_out = Evaluator(lm, task, task.items(args.n, args.seed, offset=args.n), store=store)
    base_items = {m: held_out.baseline().scores[m][0] for m in ("acc", "logprob")}

    def held_out_drop(top):
        scores = held_out.evaluate([top]).scores
        return {m: paired_drop(base_items[m], scores[m][0])["drop"] for m in base_items}

    def run(label, method, **extra):
        evaluator = Evaluator(lm, task, task.items(args.n, args.seed), store=store, progress=True)
        objective = Objective(evaluator, args.metric)
        start = time.perf_counter()
        result = method.run(objective, args.k)
        seconds = time.perf_counter() - start
        top = result.top(args.k)
        row = {"method": label, "evaluations": objective.requested,
               "model_tokens": objective.requested * evaluator.tokens_per_mask(),
               "computed": evaluator.stats.evaluations, "wall_seconds": seconds,
               "top": [str(lm.layout.head(i)) for i in top], "drop": held_out_drop(top), **extra}
        print(json.dumps(row), flush=True)
        return row

    rows = [run("1s-greedy", OneShotGreedy())]
    if args.no_iterative:
        greedy = rows[0]
    else:
        greedy = run("greedy (k=5)", Greedy())
        # greedy's first round is the one-shot sweep, read back from the store: charge its time too
        greedy["wall_seconds"] += rows[0]["wall_seconds"]
        rows.append(greedy)
    for p in map(float, args.sparsities.split(",")):
        for m in map(int, args.budgets.split(",")):
            for design, label in (("bernoulli", "csb"), ("stratified", "css")):
                rows.append(run(f"{label} m={m} p={p}", CompressedSensing(design, m, p, "cv", args.seed)))

    reference = set(greedy["top"])
    ref_tokens = greedy["model_tokens"]
    print(f"\nreference: {greedy['method']}")
    print(f"model {args.model} ({args.dtype}), arithmetic {args.subtask}, {args.n} identification + {args.n} "
          f"held-out items, identification metric {args.metric}, k={args.k}")
    print(f"held-out baseline: acc {base_items['acc'].mean():.3f}, logprob {base_items['logprob'].mean():.3f}")
    header = (f"{'method':<22}{'evals':>7}{'tokens':>10}{'tok/greedy':>11}{'wall s':>9}{'overlap':>9}"
              f"{'logprob drop':>13}{'% greedy':>9}{'acc drop':>9}{'% greedy':>9}  top-5")
    print(header)
    for r in rows:
        overlap = len(reference & set(r["top"]))
        lp_frac = r["drop"]["logprob"] / greedy["drop"]["logprob"]
        acc_frac = r["drop"]["acc"] / greedy["drop"]["acc"] if greedy["drop"]["acc"] else float("nan")
        print(f"{r['method']:<22}{r['evaluations']:>7}{r['model_tokens']:>10}{r['model_tokens'] / ref_tokens:>11.3f}"
              f"{r['wall_seconds']:>9.0f}{overlap:>7}/5{r['drop']['logprob']:>13.3f}{lp_frac:>9.0%}"
              f"{r['drop']['acc']:>9.3f}{acc_frac:>9.0%}  {','.join(r['top'])}")
    Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
