"""`adaptive-l2-tune` (and tools/tune.py): an Optuna study over the regularizer settings.

  adaptive-l2-tune --config-file configs/Synthetic/adaptive_l2.yml --trials 10 \\
      --output-dir logs/tune/amplitude --space-preset amplitude
  adaptive-l2-tune ... --trials 10          # the same storage and name again: 10 more trials
  adaptive-l2-tune ... --trials 0           # only the report (best.json, trials.csv, PNGs)
  adaptive-l2-tune ... --workers 4 --launcher slurm --partition gpu --gpus-per-job 1 \\
      --storage postgresql://user@host/db   # 4 Slurm workers on one shared study

Each trial trains in OUTPUT_DIR/trial_NNNN on a validation split of the training identities
(never the test set); the best trial's final model is then evaluated once on the test set.
Trailing KEY VALUE pairs override the config for every trial.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

from adaptive_l2.cluster import (add_cluster_arguments, call_with_devices, executor_from_args,
                                 parent_devices, wait_for)
from adaptive_l2.config import config_file_path
from adaptive_l2.tune.space import PRESETS, load_space
from adaptive_l2.tune.study import (StudySettings, build_pruner, default_storage, open_study,
                                   run_worker, split_trials, write_report)

logger = logging.getLogger("adaptive_l2.tune")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="the config every trial starts from")
    parser.add_argument("--trials", type=int, default=10,
                        help="trials to add to the study in this call (0: only the report)")
    parser.add_argument("--output-dir", required=True,
                        help="trial folders, the default SQLite study, the report")
    parser.add_argument("--study-name", default="adaptive_l2")
    parser.add_argument("--storage", default="",
                        help="SQLAlchemy URL of the study (default: sqlite:///OUTPUT_DIR/study.db)")
    space = parser.add_mutually_exclusive_group()
    space.add_argument("--space", default="", help="YAML search space: KEY: {low, high, log} ...")
    space.add_argument("--space-preset", default="", choices=sorted(PRESETS),
                       help="a built-in search space (default: amplitude)")
    parser.add_argument("--metric", default="mAP",
                        help="validation metric to optimise (fast-reid's mAP, Rank-1, metric, ...)")
    parser.add_argument("--direction", choices=["maximize", "minimize"], default="maximize")
    parser.add_argument("--pruner", default="median",
                        help="median (default), none, or threshold:X (stop below X)")
    parser.add_argument("--launcher", choices=["local", "slurm"], default="local",
                        help="local: here (--workers > 1: processes through submitit); slurm: "
                             "one Slurm job per worker")
    parser.add_argument("--workers", type=int, default=1, help="workers sharing the study")
    parser.add_argument("--sampler-seed", type=int, default=None,
                        help="seed of Optuna's sampler: the same proposals in the same order on "
                             "every call (one worker only; default: unseeded)")
    add_cluster_arguments(parser)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser


def settings_from_args(args: argparse.Namespace) -> StudySettings:
    """The study's settings, checked (config, space, pruner) before any trial or job starts."""
    space, source = load_space(args.space, args.space_preset)
    settings = StudySettings(
        config_file=os.path.abspath(config_file_path(args.config_file)), opts=list(args.opts),
        output_dir=os.path.abspath(args.output_dir), study_name=args.study_name,
        storage=args.storage or default_storage(args.output_dir), space=space,
        space_source=source, metric=args.metric, direction=args.direction, pruner=args.pruner,
        sampler_seed=args.sampler_seed)
    if args.sampler_seed is not None and args.workers > 1:
        raise ValueError(f"--sampler-seed with --workers {args.workers}: every worker would "
                         "propose the same parameters; seed a single worker only")
    settings.params()
    build_pruner(args.pruner)
    return settings


def make_worker_executor(args: argparse.Namespace, settings: StudySettings):
    """submitit's executor for the workers (None: the trials run in this process)."""
    if args.launcher == "local" and min(args.workers, args.trials) <= 1:
        return None
    if args.launcher == "local":
        args.gpus_per_job = 0  # this machine's processes see its GPUs (restore_devices) and the
        # config's MODEL.DEVICE decides
    kind = "slurm" if args.launcher == "slurm" else "local"
    return executor_from_args(kind, args, os.path.join(settings.output_dir, "jobs"),
                              "adaptive-l2-tune")


def run_trials(args: argparse.Namespace, settings: StudySettings, executor) -> List[str]:
    """The trials of this call, here or as jobs; returns the failed jobs' messages."""
    shares = split_trials(args.trials, args.workers)
    if executor is None:
        if shares:
            run_worker(settings, shares[0])
        return []
    if args.launcher == "slurm" and settings.storage.startswith("sqlite"):
        logger.warning(
            "%d Slurm workers share the SQLite file %s: every node must see it on a shared "
            "filesystem, and SQLite's locking copes with a few workers only. For many workers "
            "use a PostgreSQL server: --storage postgresql://USER@HOST/DB (pip install psycopg2).",
            len(shares), settings.storage)
    devices = parent_devices(executor)
    jobs = [executor.submit(call_with_devices, devices, run_worker, settings, share)
            for share in shares]
    print(f"[tune] {len(jobs)} workers submitted ({args.launcher}): jobs "
          f"{', '.join(str(job.job_id) for job in jobs)}; trials per worker {shares}")
    return wait_for(jobs, lambda job: "worker")


def main(argv: Optional[List[str]] = None) -> int:
    """Run the trials, then write the report; exit status 1 when no trial completed."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s",
                        datefmt="%H:%M:%S")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.trials < 0 or args.workers < 1:
        parser.error("--trials must be >= 0 and --workers >= 1")
    try:
        settings = settings_from_args(args)
        executor = make_worker_executor(args, settings)  # no Slurm, no --partition: refused now
    except (KeyError, ValueError, FileNotFoundError, RuntimeError) as error:
        parser.error(str(error.args[0] if error.args else error))
    os.makedirs(settings.output_dir, exist_ok=True)
    study = open_study(settings, create=True)
    print(f"[tune] study '{settings.study_name}' in {settings.storage}: {len(study.trials)} "
          f"trials so far, {args.trials} to add; space {settings.space_source}")
    failures = run_trials(args, settings, executor)
    if args.launcher == "slurm":
        # the test-set evaluation of the best trial needs the cluster's GPU as well
        job = executor.submit(write_report, settings)
        report_failed = wait_for([job], lambda job: "report")
        failures += report_failed
        report = {} if report_failed else job.result()
    else:
        report = write_report(settings)
    for message in failures:
        print(f"[tune] {message}", file=sys.stderr)
    print(f"[tune] trials by state: {report.get('trials')}")
    if "best_trial" not in report:
        print("[tune] no trial completed: see trials.csv", file=sys.stderr)
        return 1
    print(f"[tune] best trial {report['best_trial']}: {report['params']}, validation "
          f"{settings.metric} {report['validation_' + settings.metric]:.2f}, test "
          f"{settings.metric} {report['test_' + settings.metric]}")
    print(f"[tune] written: {os.path.join(settings.output_dir, 'best.json')}, "
          f"{report['trials_table']}, {', '.join(report['plots'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
