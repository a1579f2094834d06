"""`adaptive-l2-plot` (and tools/plot_factors.py): draw the L2 factors of a finished run."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from adaptive_l2.plotting import plot_factors


def main(argv: Optional[List[str]] = None) -> None:
    """`RUN_DIR [--out DIR]`: factor_histogram.png and factor_trajectories.png, paths printed."""
    parser = argparse.ArgumentParser(description="Draw the L2 factors of a finished run")
    parser.add_argument("run_dir", help="a run's OUTPUT_DIR (holds l2_factors.jsonl)")
    parser.add_argument("--out", default="", help="folder for the PNG files (default RUN_DIR)")
    args = parser.parse_args(argv)
    for path in plot_factors(args.run_dir, args.out):
        print(path)


if __name__ == "__main__":
    sys.exit(main())
