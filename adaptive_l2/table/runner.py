"""Running the table's rows: each row's train command (the package's train tool, `--resume` when
interrupted, `--eval-only` for a dagger row), and `run_suite`, which runs the unfinished rows in
child processes, one after the other or one per GPU slot side by side, with one line per row, a
live ETA from each row's metrics.json, and a failed row reported while the others go on."""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from adaptive_l2.run_files import CONSOLE_FILE, METRICS_FILE
from adaptive_l2.table.suite import Row, evaluated_checkpoint, iterations_of, output_dir, row_status

# A row's training process: the package's own train tool, so an installed package needs no clone.
TRAIN_MODULE = "adaptive_l2.cli.train"


def _short(path: str) -> str:
    """Paths under the current folder as relative ones (the commands run there), others absolute."""
    relative = os.path.relpath(os.path.abspath(path), os.getcwd())
    return os.path.abspath(path) if relative.startswith("..") else relative


def train_command(row: Row, output_root: str, opts: Sequence[str], num_gpus: int,
                  launcher: str, resume: bool) -> List[str]:
    """The row's train (or, for a dagger row, `--eval-only`) command: paths relative to the
    current folder where they lie under it, the seed of --seeds last so it wins."""
    args = ["--config-file", _short(row.config)]
    tail = ["OUTPUT_DIR", _short(output_dir(row, output_root)), *opts]
    if row.seed is not None:
        tail += ["SEED", str(row.seed)]  # last: the seed of --seeds wins over any SEED in opts
    if row.evaluates:
        args.append("--eval-only")
        tail = ["MODEL.WEIGHTS", _short(evaluated_checkpoint(row, output_root)), *tail]
    elif resume:
        args.append("--resume")
    if launcher == "torchrun":
        # --standalone: a free rendezvous port, so rows running side by side do not collide
        return [_short(sys.executable), "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={num_gpus}", "-m", TRAIN_MODULE, *args, *tail]
    if num_gpus > 1:
        args += ["--num-gpus", str(num_gpus)]
    return [_short(sys.executable), "-m", TRAIN_MODULE, *args, *tail]


def gpu_slots(gpus: str, per_row: int) -> List[str]:
    """'0,1,2,3' with 1 GPU per row -> ['0', '1', '2', '3']; with 2 -> ['0,1', '2,3']."""
    ids = [g.strip() for g in gpus.split(",") if g.strip()]
    if not ids or any(not g.isdigit() for g in ids) or len(set(ids)) != len(ids):
        raise ValueError(f"--gpus must list distinct GPU indices such as 0,1,2,3, got '{gpus}'")
    if per_row < 1 or len(ids) % per_row:
        raise ValueError(f"--gpus {gpus} ({len(ids)} GPUs) cannot be split into rows of "
                         f"--num-gpus {per_row}")
    return [",".join(ids[i:i + per_row]) for i in range(0, len(ids), per_row)]


@dataclass
class _Running:
    row: Row
    process: subprocess.Popen
    slot: Optional[str]
    started: float
    log_file: Optional[object]
    iterations: int = 0  # the row's total iterations (0: an evaluation)
    first_seen: Optional[Tuple[int, float]] = None  # (iteration, time) of its first logged step
    eta: str = ""


def _format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def _last_logged_iteration(directory: str) -> Optional[int]:
    """The iteration of the newest complete record of the row's metrics.json (written by
    fast-reid every SOLVER.LOG_PERIOD iterations), or None before the first one."""
    path = os.path.join(directory, METRICS_FILE)
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, os.path.getsize(path) - 4096))
            lines = handle.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return int(json.loads(line)["iteration"])
        except (ValueError, KeyError, TypeError):
            continue
    return None


def _update_eta(job: _Running, output_root: str, now: float) -> None:
    """The row's ETA from its own pace: time per iteration since its first logged step."""
    if not job.iterations:
        return
    iteration = _last_logged_iteration(output_dir(job.row, output_root))
    if iteration is None:
        return
    if job.first_seen is None or iteration < job.first_seen[0]:
        job.first_seen = (iteration, now)
        return
    done = iteration - job.first_seen[0]
    if done > 0:
        per_iteration = (now - job.first_seen[1]) / done
        job.eta = (f"it {iteration + 1}/{job.iterations}, ETA "
                   f"{_format_seconds(per_iteration * (job.iterations - iteration - 1))}")


def _console_progress(line: str) -> None:
    """One line rewritten in place on a terminal; nothing when the output is a file or a pipe."""
    if sys.stdout.isatty():
        sys.stdout.write("\r\033[K" + line)
        sys.stdout.flush()


def _row_ready(row: Row, pending: Sequence[Row], running: Sequence[_Running]) -> bool:
    """A dagger row waits until the row whose model it evaluates has finished."""
    if not row.evaluates:
        return True
    base_key = dataclasses.replace(row, name=row.evaluates, evaluates=None).key
    waiting = [r.key for r in pending] + [r.row.key for r in running]
    return base_key not in waiting


def run_suite(rows: Sequence[Row], output_root: str, opts: Sequence[str], num_gpus: int,
              launcher: str, log=print, gpus: str = "",
              start_process: Callable[..., subprocess.Popen] = subprocess.Popen,
              poll_seconds: float = 0.5,
              progress: Callable[[str], None] = _console_progress) -> List[str]:
    """Train (or, for a dagger row, evaluate) every row not finished yet; returns the keys run.

    Without `gpus`, one row at a time. With `gpus` ('0,1,2,3'), one row per slot of `num_gpus`
    GPUs side by side (CUDA_VISIBLE_DEVICES per child, MODEL.DEVICE cuda: the paper's single-GPU
    protocol). Each child's command and output go to its OUTPUT_DIR/console.txt; `log` gets one
    line when a row starts and one when it ends, `progress` the running rows' iteration and ETA.
    A failed row is reported and the others go on; RuntimeError at the end names the failures.
    `start_process` (subprocess.Popen's signature) is the seam the tests use.
    """
    slots: List[Optional[str]] = gpu_slots(gpus, num_gpus) if gpus else [None]
    row_opts = [*opts, "MODEL.DEVICE", "cuda"] if gpus else list(opts)
    pending = list(rows)
    running: List[_Running] = []
    failures: Dict[str, str] = {}
    ran: List[str] = []
    pace: Dict[str, float] = {}  # seconds per iteration of the rows finished so far (with evaluation)
    try:
        while pending or running:
            for job in [j for j in running if j.process.poll() is not None]:
                running.remove(job)
                _finish(job, output_root, failures, log, pace)
            for row in list(pending):
                free = [s for s in slots if s not in {j.slot for j in running}]
                if not free:
                    break
                if not _row_ready(row, pending, running):
                    continue
                pending.remove(row)
                job = _start_row(row, output_root, row_opts, num_gpus, launcher, free[0], failures,
                                 log, start_process, pace)
                if job is not None:
                    running.append(job)
                    ran.append(row.key)
            if running:
                time.sleep(poll_seconds)
                now = time.perf_counter()
                for job in running:
                    _update_eta(job, output_root, now)
                progress("  ".join(f"{j.row.key}: {j.eta or 'starting'}" for j in running))
    finally:
        for job in running:  # interrupted (Ctrl-C or an error here): stop our children
            job.process.terminate()
    if failures:
        raise RuntimeError("rows failed: " + "; ".join(f"{k}: {v}" for k, v in failures.items())
                           + ". Run the same command again to resume them.")
    return ran


def _start_row(row: Row, output_root: str, opts: Sequence[str], num_gpus: int, launcher: str,
               slot: Optional[str], failures: Dict[str, str], log,
               start_process: Callable[..., subprocess.Popen],
               pace: Optional[Dict[str, float]] = None) -> Optional[_Running]:
    directory = output_dir(row, output_root)
    status = row_status(directory)
    if status == "done":
        log(f"[reproduce] {row.key}: finished before, kept")
        return None
    if row.evaluates and not os.path.isfile(evaluated_checkpoint(row, output_root)):
        failures[row.key] = (f"evaluates {row.dataset}/{row.evaluates}, which has not finished: "
                             "run that row first")
        log(f"[reproduce] {row.key}: FAILED, {failures[row.key]}")
        return None
    command = train_command(row, output_root, opts, num_gpus, launcher,
                            resume=status == "interrupted")
    env = dict(os.environ)
    where = ""
    if slot is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot
        where = f" on GPU {slot}"
    os.makedirs(directory, exist_ok=True)
    console = os.path.join(directory, CONSOLE_FILE)
    log_file = open(console, "a")
    log_file.write(f"$ {shlex.join(command)}\n")
    log_file.flush()
    iterations = 0 if row.evaluates else iterations_of(row, opts)
    action = "evaluating" if row.evaluates else \
        f"{'resuming' if status == 'interrupted' else 'training'} ({iterations} iterations)"
    if iterations and pace:  # the rows before it set the pace (the demo's rows are alike)
        action += f", ETA ~{_format_seconds(iterations * statistics.median(pace.values()))}"
    log(f"[reproduce] {row.key}: {action}{where}, output in {_short(console)}")
    process = start_process(command, cwd=os.getcwd(), env=env, stdout=log_file,
                            stderr=subprocess.STDOUT)
    return _Running(row, process, slot, time.perf_counter(), log_file, iterations)


def _finish(job: _Running, output_root: str, failures: Dict[str, str], log,
            pace: Optional[Dict[str, float]] = None) -> None:
    job.log_file.close()
    _console_progress("")  # clear the progress line before the row's last line
    seconds = time.perf_counter() - job.started
    code = job.process.returncode
    if code == 0:
        if pace is not None and job.iterations:
            pace[job.row.key] = seconds / job.iterations
        log(f"[reproduce] {job.row.key}: done in {seconds:.0f} s")
        return
    directory = _short(output_dir(job.row, output_root))
    failures[job.row.key] = f"exit {code} after {seconds:.0f} s, output in {directory}/{CONSOLE_FILE}"
    log(f"[reproduce] {job.row.key}: FAILED ({failures[job.row.key]}); the other rows go on")
