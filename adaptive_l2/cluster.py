"""Jobs on a Slurm cluster (or on this machine) through submitit, for the table and the tuner.

`make_executor("slurm", ...)` is submitit's Slurm executor with the project's few settings
(partition, GPUs, CPUs, time, memory, anything else as `--slurm-param KEY=VALUE`);
`make_executor("local", ...)` is submitit's LocalExecutor: the same jobs as subprocesses of this
machine (how the tests run the job graph without Slurm). Jobs' logs go to FOLDER/%j_*.

The table: one job per row. A dagger row (`*_R152_rerank`: re-ranking of its R152 row's final
model, no training) runs in the SAME job as its R152 row, after it, when both are submitted:
that needs no Slurm dependency (which submitit's local executor cannot express, so it could not
be tested here), and an evaluation of a few minutes on the GPU the R152 row held is negligible
next to its 44,000 iterations. Inside a job the rows run through `table.runner.run_suite`, the
local runner: same commands, `console.txt`, resume of an interrupted row, kept finished rows.
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Callable, Dict, List, Optional, Sequence

import submitit

logger = logging.getLogger(__name__)

EXECUTORS = ("slurm", "local")


def parse_slurm_params(pairs: Sequence[str]) -> Dict[str, str]:
    """`--slurm-param KEY=VALUE` entries as sbatch options (`account=abc` -> `#SBATCH --account=abc`)."""
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--slurm-param '{pair}': expected KEY=VALUE (an sbatch option "
                             "without its leading dashes, e.g. account=myproject)")
        params[key] = value
    return params


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """The Slurm options the table and the tuner share."""
    group = parser.add_argument_group("Slurm (through submitit)")
    group.add_argument("--partition", default="", help="Slurm partition of the jobs")
    group.add_argument("--gpus-per-job", type=int, default=1,
                       help="GPUs per job (the table: DDP over them within a row)")
    group.add_argument("--cpus-per-job", type=int, default=8, help="CPU cores per job")
    group.add_argument("--time", type=int, default=24 * 60, dest="time_minutes",
                       help="time limit of a job in minutes (default 1440)")
    group.add_argument("--mem-gb", type=int, default=0, help="memory per job (0: Slurm's default)")
    group.add_argument("--slurm-param", action="append", default=[], metavar="KEY=VALUE",
                       help="any other sbatch option, e.g. account=abc or qos=long (repeatable)")
    group.add_argument("--job-folder", default="",
                       help="where submitit writes the jobs' scripts and logs")


def make_executor(kind: str, folder: str, *, job_name: str, partition: str = "",
                  gpus_per_job: int = 0, cpus_per_job: int = 1, time_minutes: int = 60,
                  mem_gb: int = 0, slurm_params: Optional[Dict[str, str]] = None):
    """submitit's Slurm executor or its local one, with the given resources per job."""
    if kind == "slurm":
        if not partition:
            raise ValueError("--partition is required with --launcher slurm")
        try:
            executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        except RuntimeError as error:  # submitit: 'Could not detect "srun"'
            raise RuntimeError(f"--launcher slurm: no Slurm on this machine ({error}); run the "
                               "command on the cluster's login node") from error
        params = dict(slurm_partition=partition, gpus_per_node=gpus_per_job, tasks_per_node=1,
                      nodes=1, cpus_per_task=cpus_per_job, timeout_min=time_minutes, name=job_name,
                      slurm_additional_parameters=dict(slurm_params or {}))
        if mem_gb:
            params["mem_gb"] = mem_gb
        executor.update_parameters(**params)
        return executor
    if kind == "local":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=time_minutes, gpus_per_node=gpus_per_job)
        return executor
    raise ValueError(f"executor must be one of {EXECUTORS}, got '{kind}'")


def executor_from_args(kind: str, args: argparse.Namespace, default_folder: str, job_name: str):
    """`make_executor` with the options of `add_cluster_arguments`."""
    return make_executor(kind, args.job_folder or default_folder, job_name=job_name,
                         partition=args.partition, gpus_per_job=args.gpus_per_job,
                         cpus_per_job=args.cpus_per_job, time_minutes=args.time_minutes,
                         mem_gb=args.mem_gb, slurm_params=parse_slurm_params(args.slurm_param))


def wait_for(jobs: Sequence, describe: Callable[[object], str], log=print) -> List[str]:
    """Wait for every job; returns one message per failed job (the others' results are kept)."""
    failures = []
    for job in jobs:
        try:
            job.result()
            log(f"[cluster] job {job.job_id} ({describe(job)}): done")
        except Exception as error:  # submitit re-raises the job's error (or its death)
            reason = (str(error).strip().splitlines() or [type(error).__name__])[-1]
            failures.append(f"job {job.job_id} ({describe(job)}): {reason}")
            log(f"[cluster] job {job.job_id} ({describe(job)}): FAILED, {reason}; "
                f"its log: {job.paths.stderr}")
    return failures


# -- the table: one job per row, the dagger rows in their R152 row's job -----------------------

def table_job_groups(rows: Sequence) -> List[List]:
    """Rows grouped into jobs: each row alone, except a dagger row, which joins the job of the
    row it evaluates when that row is submitted too (it runs after it there)."""
    groups: Dict[str, List] = {}
    for row in rows:
        base = row.evaluated_key
        if base in groups:
            groups[base].append(row)
        else:
            groups[row.key] = [row]
    return list(groups.values())


UNSET_DEVICES = "<unset>"


def parent_devices(executor) -> Optional[str]:
    """What a job must restore as CUDA_VISIBLE_DEVICES: this process's value (or UNSET_DEVICES)
    for submitit's local executor, which sets it from gpus_per_node ('' for 0) and would hide
    every GPU from rows whose MODEL.DEVICE is cuda; None for Slurm, which sets the job's own."""
    if isinstance(executor, submitit.LocalExecutor):
        return os.environ.get("CUDA_VISIBLE_DEVICES", UNSET_DEVICES)
    return None


def restore_devices(devices: Optional[str]) -> None:
    """Undo the local executor's CUDA_VISIBLE_DEVICES in the job (see `parent_devices`)."""
    if devices is None:
        return
    if devices == UNSET_DEVICES:
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices


def call_with_devices(devices: Optional[str], function: Callable, *args):
    """`function(*args)` in a job, with the submitting process's GPUs visible."""
    restore_devices(devices)
    return function(*args)


class TableJob(submitit.helpers.Checkpointable):
    """The body of a table job: the rows in order with the local runner (resumes, keeps finished
    rows, raises naming a failed row). Checkpointable: when Slurm preempts the job or its time
    runs out, submitit requeues it with the same rows, and an interrupted row resumes from its
    last checkpoint (the runner decides --resume when the job runs, not when it was submitted)."""

    def __init__(self, devices: Optional[str] = None) -> None:
        self.devices = devices  # CUDA_VISIBLE_DEVICES to restore (local executor), see above

    def __call__(self, rows: Sequence, output_root: str, opts: Sequence[str], num_gpus: int,
                 workdir: str) -> List[str]:
        from adaptive_l2.table.runner import run_suite

        restore_devices(self.devices)
        os.chdir(workdir)  # the rows' folders and commands are relative to where the tool ran
        return run_suite(rows, output_root, opts, num_gpus, "launch", progress=lambda line: None)


def submit_table(rows: Sequence, output_root: str, opts: Sequence[str], num_gpus: int,
                 executor, log=print) -> List:
    """One job per group of `table_job_groups` with rows still to run; returns the jobs."""
    from adaptive_l2.table.suite import output_dir, row_status

    jobs = []
    for group in table_job_groups(rows):
        if all(row_status(output_dir(row, output_root)) == "done" for row in group):
            log(f"[cluster] {', '.join(r.key for r in group)}: finished before, kept")
            continue
        job = executor.submit(TableJob(parent_devices(executor)), list(group), output_root,
                              list(opts), num_gpus, os.getcwd())
        job.rows = [row.key for row in group]
        log(f"[cluster] job {job.job_id}: {', '.join(job.rows)}")
        jobs.append(job)
    return jobs
