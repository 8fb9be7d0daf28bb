"""Each seed's head set scored under every seed's locate criterion: does a set that differs between seeds fit its
own seed's items, or did that seed's search stop short?

A locate's criterion (the target's share removed minus the penalty times the control damage) is measured on its
seed's identification items and control items. Here every recorded set is scored on every seed's items, as the
locate would score it, with the share of bootstrap resamples of those items in which each other set beats the
seed's own (the test the exchange pass applies). If another seed's set scores higher on a seed's own items in
nearly every resample, that seed's search missed it: the items did not prefer its set. `caploc locate --seeds`
runs the same check (`caploc.experiments.locate.cross_seed_check`) on its own seeds; this script applies it to sets
recorded by separate runs (bench/paper_table.py's).

    python bench/cross_seed_criterion.py --model qwen2.5-coder-0.5b --task gsm8k --store bench/paper_table.sqlite \
        --set 0=L7H11,L10H6,L11H8,L3H4,L12H0 --set 1=L13H3,L15H7,L19H6,L14H10,L10H7 \
        --set 2=L11H10,L10H6,L3H4,L7H11,L7H7
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from caploc import Criterion, EvalOptions, load_model
from caploc.experiments.locate import cross_seed_check
from caploc.experiments.specs import Runtime

from paper_table import build_task  # bench/ is on the path when run as a script


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--task", default="gsm8k", help="a bench/paper_table.py task name")
    parser.add_argument("--n", type=int, default=30, help="identification items of the locates")
    parser.add_argument("--control", default="general", help="the locates' control")
    parser.add_argument("--set", action="append", default=[], metavar="SEED=HEADS", required=True,
                        help="the set a seed's locate returned; repeatable")
    parser.add_argument("--store", default="bench/paper_table.sqlite")
    parser.add_argument("--json", default=None, help="default: bench/cross_seed_criterion_MODEL_TASK.json")
    args = parser.parse_args()

    lm = load_model(args.model, dtype=args.dtype)
    runtime = Runtime.open(lm, EvalOptions(store=args.store))
    task = build_task(args.task)
    criterion = Criterion(control=args.control)
    sets = {}
    for entry in args.set:
        seed, _, heads = entry.partition("=")
        sets[int(seed)] = [lm.layout.index(h) for h in lm.layout.parse_list(heads)]
    metric = task.identification_metric
    scoring = task.for_metric(metric)
    seeds = list(sets)
    # each seed's objective as its locate built it
    objectives = [criterion.objective(runtime, runtime.evaluator(scoring, scoring.items(args.n, seed)), metric,
                                      args.n, seed) for seed in seeds]
    cross = cross_seed_check(objectives, list(sets.values()), seeds)
    table = {}
    for i, seed in enumerate(seeds):
        table[seed] = {str(other): {"criterion": cross["criterion"][i][j], "target_drop": cross["target_drop"][i][j]}
                       | ({"control_damage": cross["control_damage"][i][j]} if cross["control_damage"][i] else {})
                       | ({"beats_own": cross["beats_own"][i][j]} if other != seed else {})
                       for j, other in enumerate(seeds)}
        print(f"seed {seed}'s items: " + "; ".join(
            f"seed {other}'s set {row['criterion']:.3f}" + (f" (beats the own set in {row['beats_own']:.0%} of the "
                                                            f"resamples)" if "beats_own" in row else "")
            for other, row in table[seed].items()), flush=True)
    out = Path(args.json or f"bench/cross_seed_criterion_{args.model}_{args.task}.json")
    out.write_text(json.dumps({"params": vars(args), "sets": {str(s): [str(lm.layout.head(h)) for h in heads]
                                                                for s, heads in sets.items()},
                               "by_items": table}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
