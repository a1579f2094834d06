"""`adaptive-l2-table` (and tools/reproduce_table.py): the paper's results table, or the same
pipeline on the embedded synthetic dataset.

  adaptive-l2-table --suite paper --dry-run          # one command per row, with its cost
  adaptive-l2-table --suite paper --rows Market1501,DukeMTMC/adaptive_l2_R50 --num-gpus 4
  adaptive-l2-table --suite paper --gpus 0,1,2,3      # one row per GPU, side by side
  adaptive-l2-table --suite paper --emit-commands jobs.txt   # one line per row, job arrays
  adaptive-l2-table --suite paper --collect          # the table from finished runs
  adaptive-l2-table --suite synthetic                # CPU, minutes: the demo
  adaptive-l2-table --suite study --seeds 0,1,2,3,4  # each row once per seed: mean +/- 95 % CI
  adaptive-l2-table --suite paper --launcher slurm --partition gpu --gpus-per-job 1   # a job per row
Runs go under the current folder (logs/SUITE/DATASET/ROW); each row's output is in its folder
(console.txt, log.txt), the console shows one line per row and the table. Rows already finished
are kept; an interrupted row resumes from its last checkpoint; a failed row is reported and the
others go on (exit status 1 at the end).
With --seeds, each row runs once per seed (SEED S, folder DATASET/ROW/seedS; finished ones kept),
and results_seeds.md / .csv give per row the mean +/- 95 % confidence interval (Student t) of each
metric and its paired difference to the suite's reference row (paired t over the seeds).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import List, Optional

from adaptive_l2.cluster import add_cluster_arguments, executor_from_args, submit_table, wait_for
from adaptive_l2.table.cost import MEASURED_STEPS, WARMUP_STEPS, dry_run
from adaptive_l2.table.report import collect_and_write, collect_seeds_and_write
from adaptive_l2.table.runner import gpu_slots, run_suite, train_command
from adaptive_l2.table.suite import (REFERENCE_ROWS, SUITES, output_dir, parse_seeds, row_status,
                                     seeded_rows, select_rows, suite_rows)


def main(argv: Optional[List[str]] = None) -> int:
    """Dry-run, emit, run or collect the suite; the exit status (1 when a row failed)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--suite", choices=list(SUITES), default="paper")
    parser.add_argument("--rows", type=lambda text: [r for r in text.split(",") if r], default=[],
                        help="comma-separated subset: DATASET, ROW or DATASET/ROW names "
                             "(default: all)")
    parser.add_argument("--seeds", default="",
                        help="comma-separated seeds, e.g. 0,1,2,3,4: every row once per seed, "
                             "reported as mean +/- 95 %% CI and paired differences to the "
                             "reference row (" + ", ".join(f"{k}: {v}" for k, v in
                                                      REFERENCE_ROWS.items()) + ")")
    parser.add_argument("--with-sgp", action="store_true",
                        help="add the SGP (reconstructed from the abstract) and AT comparator rows")
    parser.add_argument("--output-root", default="",
                        help="runs go to OUTPUT_ROOT/DATASET/ROW (default logs/paper or "
                             "logs/synthetic, under the current folder)")
    parser.add_argument("--num-gpus", type=int, default=1,
                        help="processes (GPUs) per row: DDP within a row")
    parser.add_argument("--gpus", default="",
                        help="GPU indices, e.g. 0,1,2,3: rows run side by side, one per group of "
                             "--num-gpus GPUs (CUDA_VISIBLE_DEVICES per row, MODEL.DEVICE cuda)")
    parser.add_argument("--launcher", choices=["launch", "torchrun", "slurm", "submitit-local"],
                        default="launch",
                        help="launch / torchrun: rows run here; slurm: one Slurm job per row "
                             "(--num-gpus = --gpus-per-job), dagger rows in their R152 row's job; "
                             "submitit-local: the same jobs as processes of this machine")
    parser.add_argument("--wait", action="store_true",
                        help="slurm: wait for the jobs, then write the table (default: submit "
                             "and exit; --collect later)")
    add_cluster_arguments(parser)
    parser.add_argument("--dry-run", action="store_true", help="print the commands and their cost")
    parser.add_argument("--no-measure", action="store_true", help="dry run without timing steps")
    parser.add_argument("--device", default="", help="device the dry run times steps on")
    parser.add_argument("--measure-steps", type=int, default=MEASURED_STEPS,
                        help=f"dry run: median of this many training steps (default {MEASURED_STEPS}) "
                             f"after {WARMUP_STEPS} warm-up steps")
    parser.add_argument("--emit-commands", default="", help="write one command per row to FILE")
    parser.add_argument("--collect", action="store_true", help="only collect finished runs")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for every row")
    args = parser.parse_args(argv)

    root = args.output_root or os.path.join("logs", args.suite)
    try:
        rows = select_rows(suite_rows(args.suite, args.with_sgp), args.rows)
        seeds = parse_seeds(args.seeds) if args.seeds else []
        if args.gpus:
            gpu_slots(args.gpus, args.num_gpus)
    except ValueError as error:
        parser.error(str(error))
    runs = seeded_rows(rows, seeds) if seeds else rows
    if args.dry_run:
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        print(dry_run(runs, root, args.opts, args.num_gpus, args.launcher, device,
                      measure=not args.no_measure, gpus=args.gpus, steps=args.measure_steps))
        return 0
    if args.emit_commands:
        with open(args.emit_commands, "w") as handle:
            for row in runs:
                resume = row_status(output_dir(row, root)) == "interrupted"
                handle.write(shlex.join(train_command(row, root, args.opts, args.num_gpus,
                                                      args.launcher, resume)) + "\n")
        print(f"{len(runs)} commands written to {args.emit_commands}")
        return 0
    if args.launcher in ("slurm", "submitit-local") and not args.collect:
        return submit_jobs(args, rows, seeds, root)
    failure = None
    if not args.collect:
        try:
            run_suite(runs, root, args.opts, args.num_gpus, args.launcher, gpus=args.gpus)
        except RuntimeError as error:  # the table of what finished is still written
            failure = error
    print_table(args, rows, seeds, root)
    if failure is not None:
        print(f"[reproduce] {failure}", file=sys.stderr)
        return 1
    return 0


def collect_command(args: argparse.Namespace, root: str) -> List[str]:
    """The command that writes the table of these runs later: the same selection (suite, rows,
    seeds, SGP rows, overrides), --collect."""
    command = ["adaptive-l2-table", "--suite", args.suite, "--output-root", root, "--collect"]
    if args.rows:
        command += ["--rows", ",".join(args.rows)]
    if args.seeds:
        command += ["--seeds", args.seeds]
    if args.with_sgp:
        command.append("--with-sgp")
    return command + list(args.opts)


def print_table(args: argparse.Namespace, rows, seeds: List[int], root: str) -> None:
    """The table of the finished runs (per seed: mean +/- CI and paired differences), written
    under `root` and printed."""
    draw = args.suite in ("synthetic", "study")
    if seeds:
        table, paths = collect_seeds_and_write(rows, seeds, root, REFERENCE_ROWS[args.suite],
                                               args.opts, draw_factors=draw)
    else:
        table, paths = collect_and_write(rows, root, args.opts, draw_factors=draw)
    print(table)
    for path in paths:
        print(f"written: {path}")


def submit_jobs(args: argparse.Namespace, rows, seeds: List[int], root: str) -> int:
    """--launcher slurm / submitit-local: one job per row (adaptive_l2.cluster); with --wait (always
    for submitit-local) the table of what finished is written after the jobs."""
    kind = "slurm" if args.launcher == "slurm" else "local"
    if kind == "local":
        args.gpus_per_job = 0  # this machine's processes see its GPUs (cluster.restore_devices)
        # and the rows' own MODEL.DEVICE decides
    try:
        executor = executor_from_args(kind, args, os.path.join(root, "jobs"), "adaptive-l2-table")
    except (ValueError, RuntimeError) as error:  # no --partition, or no Slurm here
        print(f"[reproduce] {error}", file=sys.stderr)
        return 2
    runs = seeded_rows(rows, seeds) if seeds else rows
    jobs = submit_table(runs, root, args.opts, max(1, args.gpus_per_job), executor)
    if kind == "slurm" and not args.wait:
        print(f"{len(jobs)} jobs submitted; when they have ended: "
              f"{shlex.join(collect_command(args, root))}")
        return 0
    failures = wait_for(jobs, lambda job: ", ".join(job.rows))
    print_table(args, rows, seeds, root)
    for failure in failures:
        print(f"[reproduce] {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
