"""Per-item overhead of the sandbox: a trivial program run plainly (python -I) vs in each isolation mechanism.

Usage: python bench/sandbox_overhead.py [--runs 20]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from caploc import sandbox


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    code = "assert sum(range(10)) == 45\n"

    def timed(fn):
        fn()  # warm-up (and the probe, for the sandbox)
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    plain = timed(lambda: subprocess.run([sys.executable, "-I", "-c", code], check=True))
    print(f"plain python -I: {1000 * plain:.0f} ms per program (median of {args.runs})")
    for mechanism in ("bwrap", "namespaces"):
        if sandbox.probe(mechanism) is None:
            print(f"{mechanism}: not available here")
            continue
        seconds = timed(lambda: sandbox._run(mechanism, code, 10.0, 1024, 32))
        print(f"{mechanism}: {1000 * seconds:.0f} ms per program, {1000 * (seconds - plain):.0f} ms overhead "
              f"({seconds / plain:.1f}x plain)")


if __name__ == "__main__":
    main()
