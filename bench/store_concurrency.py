"""Many processes, one store: `--processes` default locates (different seeds) at once on one fresh store, for
`--trials` trials; every process must finish, and its result must equal the same seed run alone on a store of
its own. Then a rerun of the first seed from the full store: its budget and wall time (the model load apart).

    python bench/store_concurrency.py --trials 20 --processes 4 --n 10
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def locate(seed: int, store: Path, args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "caploc", "locate", "--model", args.model, "--task", "arithmetic",
                             "--subtask", "2D+", "--n", str(args.n), "--seed", str(seed), "--store", str(store),
                             "--quiet", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"OMP_NUM_THREADS": str(args.threads)})


def essentials(result: dict) -> dict:
    """What must not depend on who else wrote to the store."""
    return {k: result[k] for k in ("ranking", "heads", "validation", "identification", "control_validation")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--json", default="bench/store_concurrency.json")
    # torch threads per process, the serial runs' too (default: the cores shared by the processes): four
    # 2-thread processes on 2 cores spend their time waiting on one another (a trial took over 15 min)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.processes)
    seeds = list(range(args.processes))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        serial = {}
        for seed in seeds:  # each seed alone, on a store of its own
            proc = locate(seed, tmp / f"alone-{seed}.sqlite", args)
            out, err = proc.communicate()
            assert proc.returncode == 0, err
            serial[seed] = essentials(json.loads(out))
        trials = []
        for trial in range(args.trials):
            store = tmp / f"shared-{trial}.sqlite"
            started = time.perf_counter()
            procs = {seed: locate(seed, store, args) for seed in seeds}
            outcome = {"trial": trial, "finished": 0, "identical": 0, "errors": []}
            for seed, proc in procs.items():
                out, err = proc.communicate()
                if proc.returncode != 0:
                    outcome["errors"].append(err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}")
                    continue
                outcome["finished"] += 1
                outcome["identical"] += essentials(json.loads(out)) == serial[seed]
            outcome["seconds"] = round(time.perf_counter() - started, 1)
            print(json.dumps(outcome), flush=True)
            trials.append(outcome)
        # a rerun from the full store: nothing computed, no gradient run
        started = time.perf_counter()
        proc = locate(seeds[0], tmp / f"shared-{args.trials - 1}.sqlite", args)
        out, err = proc.communicate()
        rerun = json.loads(out)["budget"] | {"process_seconds": round(time.perf_counter() - started, 1)}
    summary = {"args": vars(args), "finished": sum(t["finished"] for t in trials),
               "identical": sum(t["identical"] for t in trials), "runs": args.trials * args.processes,
               "trials": trials, "rerun": rerun}
    Path(args.json).write_text(json.dumps(summary, indent=2))
    print(f"{summary['finished']} of {summary['runs']} runs finished, {summary['identical']} identical to the "
          f"serial runs; rerun from the full store: {rerun['computed_evaluations']} computed evaluations, "
          f"{rerun['gradient_model_tokens']} gradient tokens, {rerun['wall_seconds']} s locate, "
          f"{rerun['process_seconds']} s with the model load")


if __name__ == "__main__":
    main()
