#!/usr/bin/env python3
"""`make bench`: every benchmark in benchmarks/ at its short setting, one after the other.

Each script runs in its own process (its times and memory are its own) and prints its figures;
a summary with each one's status and wall time follows. Scripts named bench_*.py that are not in
SHORT_ARGS run with their own defaults. gpu_check.py is not a benchmark (run it on a GPU machine).
Exit status 1 when a benchmark failed.
"""
from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import time
from typing import Dict, List, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))

# The short setting of each benchmark (minutes on 2 CPU cores, not the full-size run).
SHORT_ARGS: Dict[str, List[str]] = {
    "bench_keras_adam.py": ["--rounds", "3"],  # KerasAdam vs torch's Adam over R50's tensors
    "bench_penalty.py": ["--rounds", "5"],  # R50 batch 16, 5 interleaved on/off step pairs
    "bench_rerank.py": ["--quick"],  # 200 query x 1000 gallery, dim 256
    "bench_sgp.py": ["--part", "cost", "--rounds", "3"],  # the step costs, not the 25-min training
}


def benchmark_scripts(directory: str = HERE) -> List[str]:
    return sorted(glob.glob(os.path.join(directory, "bench_*.py")))


def run_all(scripts: Sequence[str], full: bool = False, python: str = sys.executable) -> Dict[str, dict]:
    """Run each script (short arguments unless `full`); its output streams to this console."""
    results = {}
    for script in scripts:
        name = os.path.basename(script)
        args = [] if full else SHORT_ARGS.get(name, [])
        print(f"\n===== {name} {' '.join(args)}", flush=True)
        start = time.perf_counter()
        code = subprocess.run([python, script, *args], cwd=os.path.dirname(HERE)).returncode
        results[name] = {"exit": code, "seconds": time.perf_counter() - start}
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="each benchmark's own default sizes")
    parser.add_argument("--only", default="", help="comma-separated script names (bench_x.py)")
    parser.add_argument("--dir", default=HERE, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    scripts = benchmark_scripts(args.dir)
    if args.only:
        wanted = [n for n in args.only.split(",") if n]
        known = {os.path.basename(s): s for s in scripts}
        unknown = [n for n in wanted if n not in known]
        if unknown:
            parser.error(f"--only: unknown {unknown}; benchmarks: {sorted(known)}")
        scripts = [known[n] for n in wanted]
    results = run_all(scripts, full=args.full)
    print("\n===== summary")
    for name, result in results.items():
        status = "ok" if result["exit"] == 0 else f"FAILED (exit {result['exit']})"
        print(f"{name:20s} {status:18s} {result['seconds']:7.1f} s")
    return 0 if all(r["exit"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
