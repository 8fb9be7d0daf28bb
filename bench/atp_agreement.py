"""How well attribution patching (one forward + backward pass) predicts the exact single-head ablation sweep.

For each task: the AtP estimate of every head's drop vs the exact drop of ablating it alone (N evaluations,
read from the store when a benchmark already ran them): Spearman rank correlation and the recall of the exact
top-10 within AtP's top-10 (and top-20).

Usage: python bench/atp_agreement.py [--tasks arithmetic,induction,ioi] [--n 20] [--seed 0]
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy.stats import spearmanr

from caploc import load_model
from caploc.evaluator import Evaluator
from caploc.methods import Objective
from caploc.store import EvalStore
from caploc.tasks import get_task

TASK_OPTIONS = {"arithmetic": {"subtask": "2D+"}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--tasks", default="arithmetic,induction,ioi")
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--store", default="bench/locate_quality.sqlite")
    args = parser.parse_args()
    lm = load_model(args.model, dtype=args.dtype)
    store = EvalStore(args.store)
    print("| task | metric | Spearman(AtP, exact) | exact top-10 in AtP top-10 | in AtP top-20 |")
    print("|---|---|---|---|---|")
    for name in args.tasks.split(","):
        task = get_task(name, **TASK_OPTIONS.get(name, {}))
        evaluator = Evaluator(lm, task, task.items(args.n, args.seed), store=store, progress=True)
        objective = Objective(evaluator, task.identification_metric)
        estimated, _ = objective.estimated_drops()
        exact = objective.drops(objective.set_masks([[i] for i in range(lm.layout.n_total)]))
        top_exact = set(np.argsort(-exact)[:10])
        recall10 = len(top_exact & set(np.argsort(-estimated)[:10])) / 10
        recall20 = len(top_exact & set(np.argsort(-estimated)[:20])) / 10
        rho = spearmanr(estimated, exact).statistic
        print(f"| {name} | {task.identification_metric} | {rho:.3f} | {recall10:.0%} | {recall20:.0%} |", flush=True)


if __name__ == "__main__":
    main()
