#!/usr/bin/env python3
"""Draw the L2 factors of a finished run: `tools/plot_factors.py RUN_DIR [--out DIR]`."""
import argparse

from adaptive_l2.plotting import plot_factors

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", help="a run's OUTPUT_DIR (holds l2_factors.jsonl)")
    parser.add_argument("--out", default="", help="folder for the PNG files (default RUN_DIR)")
    args = parser.parse_args()
    for path in plot_factors(args.run_dir, args.out):
        print(path)
