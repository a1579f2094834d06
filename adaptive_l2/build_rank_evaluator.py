"""Build fast-reid's Cython rank evaluator inside the installed fastreid package.

fast-reid compiles it at the first evaluation of a run, with whatever `python3` is first on PATH,
and exits the process if that fails. `make install` runs this module instead, once, with the
interpreter of the environment: `python -m adaptive_l2.build_rank_evaluator`.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys


def rank_evaluator_dir() -> str:
    spec = importlib.util.find_spec("fastreid")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("fastreid is not installed: run `make install` (see README)")
    return os.path.join(spec.submodule_search_locations[0], "evaluation", "rank_cylib")


def is_built() -> bool:
    return importlib.util.find_spec("fastreid.evaluation.rank_cylib.rank_cy") is not None


def build() -> None:
    if is_built():
        print("fast-reid rank evaluator: already built")
        return
    folder = rank_evaluator_dir()
    result = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"],
        cwd=folder, capture_output=True, text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"building fast-reid's rank evaluator in {folder} failed:\n{result.stderr[-4000:]}"
        )
    print(f"fast-reid rank evaluator: built in {folder}")


if __name__ == "__main__":
    build()
