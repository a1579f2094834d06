#!/usr/bin/env python3
"""Rebuild the paper's results table, or the same pipeline on the embedded synthetic dataset.

  tools/reproduce_table.py --suite paper --dry-run          # one command per row, with its cost
  tools/reproduce_table.py --suite paper --rows Market1501,DukeMTMC/adaptive_l2_R50 --num-gpus 4
  tools/reproduce_table.py --suite paper --emit-commands jobs.txt   # one line per row, job arrays
  tools/reproduce_table.py --suite paper --collect          # the table from finished runs
  tools/reproduce_table.py --suite synthetic                # CPU, minutes: the demo
Rows already finished are kept; an interrupted row resumes from its last checkpoint.
"""
import argparse
import os
import shlex

from adaptive_l2.reproduce import (collect_and_write, dry_run, output_dir, row_status,
                                   run_suite, select_rows, suite_rows, train_command)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--suite", choices=["paper", "synthetic"], default="paper")
    parser.add_argument("--rows", type=lambda text: [r for r in text.split(",") if r], default=[],
                        help="comma-separated subset: DATASET, ROW or DATASET/ROW names "
                             "(default: all)")
    parser.add_argument("--with-sgp", action="store_true",
                        help="add the SGP (reconstructed from the abstract) and AT comparator rows")
    parser.add_argument("--output-root", default="",
                        help="runs go to OUTPUT_ROOT/DATASET/ROW (default logs/paper or logs/synthetic)")
    parser.add_argument("--num-gpus", type=int, default=1, help="processes per run")
    parser.add_argument("--launcher", choices=["launch", "torchrun"], default="launch")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and their cost")
    parser.add_argument("--no-measure", action="store_true", help="dry run without timing steps")
    parser.add_argument("--device", default="", help="device the dry run times steps on")
    parser.add_argument("--emit-commands", default="", help="write one command per row to FILE")
    parser.add_argument("--collect", action="store_true", help="only collect finished runs")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for every row")
    args = parser.parse_args()

    root = args.output_root or os.path.join("logs", args.suite)
    rows = select_rows(suite_rows(args.suite, args.with_sgp), args.rows)
    if args.dry_run:
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        print(dry_run(rows, root, args.opts, args.num_gpus, args.launcher, device,
                      measure=not args.no_measure))
        return
    if args.emit_commands:
        with open(args.emit_commands, "w") as handle:
            for row in rows:
                resume = row_status(output_dir(row, root)) == "interrupted"
                handle.write(shlex.join(train_command(row, root, args.opts, args.num_gpus,
                                                      args.launcher, resume)) + "\n")
        print(f"{len(rows)} commands written to {args.emit_commands}")
        return
    if not args.collect:
        run_suite(rows, root, args.opts, args.num_gpus, args.launcher)
    table, paths = collect_and_write(rows, root, args.opts, draw_factors=args.suite == "synthetic")
    print(table)
    for path in paths:
        print(f"written: {path}")


if __name__ == "__main__":
    main()
