"""Head sets already found, ablated on each seed's held-out items: every metric of the task, beside the
reference's per-token log-probability, and the generations themselves (kept in the JSON).

A locate validates its set on its own seed's held-out items only. This puts every recorded set on every seed's
held-out items (the items after that seed's identification items), so that a drop can be told from a set that
fits its seed. For GSM8K it also counts the solutions that go on after their `#### N` line (a new question, a
new "Human:" turn): lm-eval's flexible-extract (`acc`, the last number) loses those answers, its strict-match
(`acc_strict`, the first `#### N`) does not.

    python bench/heldout_sets.py --model qwen2.5-coder-1.5b --task gsm8k --seeds 0,1 \
        --set "gsm8k seed 0=L17H9,L17H7,L12H3,L10H4,L19H6" --set "gsm8k seed 1=L17H7,L18H5,L11H8,L17H3,L18H1"
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np

from caploc import load_model
from caploc.evaluator import Evaluator
from caploc.stats import paired_drop

from paper_table import build_task  # bench/ is on the path when run as a script

AFTER_ANSWER = re.compile(r"#### [^\n]*\n\s*\S")  # text after the line of the final answer


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--task", default="gsm8k", help="a bench/paper_table.py task name")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--n", type=int, default=30, help="identification items of the locates (held-out start after)")
    parser.add_argument("--n-heldout", type=int, default=30)
    parser.add_argument("--set", action="append", default=[], metavar="LABEL=HEADS", required=True)
    parser.add_argument("--json", default=None, help="default: bench/heldout_sets_MODEL_TASK.json")
    args = parser.parse_args()
    lm = load_model(args.model, dtype=args.dtype)
    task = build_task(args.task)
    labels, sets = zip(*(s.split("=", 1) for s in args.set))
    masks = [[]] + [[lm.layout.index(h) for h in lm.layout.parse_list(heads)] for heads in sets]
    out = {"params": vars(args), "sets": dict(zip(labels, sets)), "seeds": {}}
    path = Path(args.json or f"bench/heldout_sets_{args.model}_{args.task}.json")
    for seed in (int(s) for s in args.seeds.split(",")):
        items = task.items(args.n_heldout, seed, offset=args.n)
        started = time.perf_counter()
        row = {"items": [i.id for i in items], "sets": {}}
        for scoring in task.scorings():
            result = Evaluator(lm, scoring, scoring.from_source(items), progress=True).evaluate(masks)
            for metric, values in result.scores.items():
                row.setdefault("baseline", {})[metric] = float(values[0].mean())
                binary = np.isin(values, (0, 1)).all()  # a 0/1 score: the items each set loses and gains
                for label, ablated in zip(labels, values[1:]):
                    entry = paired_drop(values[0], ablated, metric=metric) | {"ablated": float(ablated.mean())}
                    if binary:
                        entry |= {"lost": int(((values[0] == 1) & (ablated == 0)).sum()),
                                  "gained": int(((values[0] == 0) & (ablated == 1)).sum())}
                    row["sets"].setdefault(label, {})[metric] = entry
            if result.texts is not None:
                row["texts"] = dict(zip(["intact", *labels], result.texts))
                row["chars"] = {k: float(np.mean([len(t) for t in v])) for k, v in row["texts"].items()}
                if args.task == "gsm8k":
                    row["after_answer"] = {k: sum(bool(AFTER_ANSWER.search(task.cut_at_stop(t))) for t in v)
                                           for k, v in row["texts"].items()}
        row["seconds"] = time.perf_counter() - started
        out["seeds"][str(seed)] = row
        path.write_text(json.dumps(out, indent=1))
        print(f"seed {seed} held-out ({len(items)}): baseline {row['baseline']}")
        for label, metrics in row["sets"].items():
            print(f"  {label}: " + ", ".join(f"{m} {v['ablated']:.3f} ({v['relative_drop']:+.0%})"
                                            for m, v in metrics.items())
                  + (f"; {row['after_answer'][label]} go on after #### N" if "after_answer" in row else ""))


if __name__ == "__main__":
    main()
