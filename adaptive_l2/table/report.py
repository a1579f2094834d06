"""Rebuild the paper's results table (and the same table on the embedded synthetic dataset).

A suite is a list of rows, each a config file. `run_suite` trains the rows that have not finished
(a row is finished when its OUTPUT_DIR holds final_results.json; an interrupted row resumes from
its last checkpoint) with tools/train_net.py in child processes: one after the other, or side by
side with one row per GPU slot (`gpus`); a row may itself use several GPUs (fast-reid's launch or
torchrun). A failed row is reported and the others go on. `dry_run` prints each row's command and
its cost, timed with the trainer's own training step. `collect` reads every row's evaluation
history and lays the results out beside the paper's numbers: the final model, and the best
evaluation of the second phase, labelled "selected on test" as the original code selected it.
With several seeds (`seeded_rows`, the last section), each row runs once per seed in its own
folder, and `collect_seeds_and_write` reports mean +/- 95 % CI and paired differences to the
suite's reference row (REFERENCE_ROWS; the statistics are in adaptive_l2.intervals).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from adaptive_l2.config import l2_term, load_config, shipped_configs_dir
from adaptive_l2.run_files import (CONSOLE_FILE, EVAL_HISTORY_FILE, FACTORS_FILE, FINAL_MODEL,
                                   LAST_CHECKPOINT, METRICS_FILE, RESULTS_FILE, TABLE_CSV,
                                   TABLE_MARKDOWN, TABLE_SEEDS_CSV, TABLE_SEEDS_MARKDOWN)

# A row's training process: the package's own train tool, so an installed package needs no clone.
TRAIN_MODULE = "adaptive_l2.cli.train"

# Ni et al. 2020, results table (mAP, Rank-1); None where the paper has no such row.
PAPER_NUMBERS = {
    ("Market1501", "conventional_l2_R50"): (87.2, 94.6),
    ("Market1501", "adaptive_l2_R50"): (88.3, 95.3),
    ("Market1501", "adaptive_l2_R101"): (88.6, 94.8),
    ("Market1501", "adaptive_l2_R152"): (88.9, 95.6),
    ("Market1501", "adaptive_l2_R152_rerank"): (94.4, 96.0),
    ("DukeMTMC", "conventional_l2_R50"): (78.9, 88.0),
    ("DukeMTMC", "adaptive_l2_R50"): (79.9, 88.9),
    ("DukeMTMC", "adaptive_l2_R101"): (80.6, 89.2),
    ("DukeMTMC", "adaptive_l2_R152"): (81.0, 90.2),
    ("DukeMTMC", "adaptive_l2_R152_rerank"): (90.7, 92.2),
    ("MSMT17", "conventional_l2_R50"): (57.7, 79.1),
    ("MSMT17", "adaptive_l2_R50"): (59.4, 79.6),
    ("MSMT17", "adaptive_l2_R101"): (61.9, 81.3),
    ("MSMT17", "adaptive_l2_R152"): (62.2, 81.7),
    ("MSMT17", "adaptive_l2_R152_rerank"): (76.7, 84.9),
}
PAPER_ROWS = ("conventional_l2_R50", "adaptive_l2_R50", "adaptive_l2_R101", "adaptive_l2_R152",
              "adaptive_l2_R152_rerank")
RERANK_SUFFIX = "_rerank"
SYNTHETIC_ROWS = ("baseline", "conventional_l2", "adaptive_l2")
SYNTHETIC_SGP_ROWS = ("sgp", "adaptive_l2_sgp", "at")
# The multi-seed study of the adaptive term's dynamics (configs/Study/, README "Multi-seed study")
STUDY_ROWS = ("none", "conventional", "adaptive", "adaptive_decoupled")
SUITES = ("paper", "synthetic", "study")
# Each suite's reference row: every other row's paired difference over seeds is taken against it
# (per dataset). The paper has no row without an L2 term: its reference is conventional L2.
REFERENCE_ROWS = {"paper": "conventional_l2_R50", "synthetic": "baseline", "study": "none"}


@dataclass(frozen=True)
class Row:
    dataset: str
    name: str
    config: str
    # a row that trains nothing: it evaluates this row's final checkpoint with its own config
    # (the dagger row: k-reciprocal re-ranking of the R152 model, as in the paper)
    evaluates: Optional[str] = None
    # --seeds: this run of the row uses SEED `seed` and its own folder (None: the config's SEED)
    seed: Optional[int] = None

    @property
    def key(self) -> str:
        key = f"{self.dataset}/{self.name}"
        return key if self.seed is None else f"{key}/{seed_folder(self.seed)}"

    @property
    def evaluated_key(self) -> Optional[str]:
        """The key of the row this row evaluates, with the same seed; None for a training row."""
        if self.evaluates is None:
            return None
        return dataclasses.replace(self, name=self.evaluates, evaluates=None).key


def suite_rows(suite: str, with_sgp: bool = False) -> List[Row]:
    if suite == "paper":
        names = PAPER_ROWS + (("sgp_R50", "adaptive_l2_sgp_R50", "at_R50") if with_sgp else ())
        return [Row(ds, name, os.path.join(shipped_configs_dir(), "Paper", ds, f"{name}.yml"),
                    evaluates=name[: -len(RERANK_SUFFIX)] if name.endswith(RERANK_SUFFIX) else None)
                for ds in ("Market1501", "DukeMTMC", "MSMT17") for name in names]
    if suite == "synthetic":
        names = SYNTHETIC_ROWS + (SYNTHETIC_SGP_ROWS if with_sgp else ())
        return [Row("Synthetic", name, os.path.join(shipped_configs_dir(), "Synthetic", f"{name}.yml"))
                for name in names]
    if suite == "study":
        return [Row("Study", name, os.path.join(shipped_configs_dir(), "Study", f"{name}.yml"))
                for name in STUDY_ROWS]
    raise ValueError(f"--suite must be one of {', '.join(SUITES)}, got '{suite}'")


def select_rows(rows: Sequence[Row], only: Sequence[str]) -> List[Row]:
    """The rows named in `only` (DATASET, ROW or DATASET/ROW names); every name must match one,
    so a typo is refused instead of silently dropping the row it meant."""
    if not only:
        return list(rows)
    unknown = [name for name in only
               if not any(name in (r.key, r.name, r.dataset) for r in rows)]
    if unknown:
        datasets = list(dict.fromkeys(r.dataset for r in rows))
        names = list(dict.fromkeys(r.name for r in rows))
        raise ValueError(
            f"--rows: unknown name(s) {unknown}. Valid names: datasets {datasets}, rows {names}, "
            f"or DATASET/ROW such as '{rows[0].key}'")
    return [r for r in rows if r.key in only or r.name in only or r.dataset in only]


def output_dir(row: Row, output_root: str) -> str:
    """A row's OUTPUT_DIR (ROOT/DATASET/ROW, or ROOT/DATASET/ROW/seedS for one seed of --seeds);
    a relative root is taken from the current folder, where runs execute."""
    directory = os.path.join(output_root, row.dataset, row.name)
    return directory if row.seed is None else os.path.join(directory, seed_folder(row.seed))


def row_status(directory: str) -> str:
    if os.path.isfile(os.path.join(directory, RESULTS_FILE)):
        return "done"
    if os.path.isfile(os.path.join(directory, LAST_CHECKPOINT)):
        return "interrupted"
    return "todo"


def _short(path: str) -> str:
    """Paths under the current folder as relative ones (the commands run there), others absolute."""
    relative = os.path.relpath(os.path.abspath(path), os.getcwd())
    return os.path.abspath(path) if relative.startswith("..") else relative


def evaluated_checkpoint(row: Row, output_root: str) -> str:
    base = dataclasses.replace(row, name=row.evaluates, evaluates=None)  # same seed
    return os.path.join(output_dir(base, output_root), FINAL_MODEL)


def train_command(row: Row, output_root: str, opts: Sequence[str], num_gpus: int,
                  launcher: str, resume: bool) -> List[str]:
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


def iterations_of(row: Row, opts: Sequence[str]) -> int:
    cfg = load_config(row.config, [*opts, "MODEL.DEVICE", "cpu"])  # only counts: any machine
    per_epoch = cfg.SOLVER.ITERS_PER_EPOCH
    if per_epoch <= 0:
        syn = cfg.DATASETS.SYNTHETIC
        images = syn.NUM_TRAIN_IDS * syn.IMAGES_PER_ID
        per_epoch = max(1, images // cfg.SOLVER.IMS_PER_BATCH)
    return cfg.SOLVER.MAX_EPOCH * per_epoch


WARMUP_STEPS = 2  # untimed steps first: allocator, cuDNN autotuning, lazy initialisation
MEASURED_STEPS = 7  # the median of 7 ignores up to 3 steps slowed by other processes


def median_step_seconds(run_step: Callable[[], object], warmup: int = WARMUP_STEPS,
                        steps: int = MEASURED_STEPS, clock: Callable[[], float] = time.perf_counter,
                        synchronize: Callable[[], object] = lambda: None) -> float:
    """Median wall time (s) of `steps` calls of `run_step` after `warmup` untimed ones.

    The median, not the fastest: on a shared machine the fastest of two steps of the same R50
    estimate swung 5.5x (246 vs 44.7 s/it); a median of several steps is stable to a few percent.
    `synchronize` waits for queued GPU work, so each sample is the step's real time.
    """
    if warmup < 0 or steps < 1:
        raise ValueError(f"median_step_seconds needs warmup >= 0 and steps >= 1, got {warmup}, {steps}")
    for _ in range(warmup):
        run_step()
    synchronize()
    samples = []
    for _ in range(steps):
        start = clock()
        run_step()
        synchronize()
        samples.append(clock() - start)
    return statistics.median(samples)


def synthetic_batch(cfg, batch_size: int) -> dict:
    """A fixed random batch of the config's training size: P identities x K images, as the
    sampler gives (K = DATALOADER.NUM_INSTANCE, at least 2 identities)."""
    import torch

    height, width = cfg.INPUT.SIZE_TRAIN
    per_id = max(1, min(cfg.DATALOADER.NUM_INSTANCE, batch_size // 2))
    generator = torch.Generator().manual_seed(0)
    device = cfg.MODEL.DEVICE
    return {"images": (torch.rand(batch_size, 3, height, width, generator=generator) * 255).to(device),
            "targets": (torch.arange(batch_size) // per_id).to(device),
            "camids": torch.zeros(batch_size, dtype=torch.long, device=device)}


def fixed_batch_train_step(cfg, batch_size: int):
    """The trainer's own step (Trainer.build_model / build_optimizer / build_train_step, so the
    L2 penalty, SGP, AT and AMP are the ones training runs) fed one fixed batch forever: what an
    iteration costs without data loading. MODEL.HEADS.NUM_CLASSES must cover the batch's ids."""
    from adaptive_l2.trainer import Trainer, resolve_amp

    cfg = resolve_amp(cfg)
    model = Trainer.build_model(cfg)
    optimizer, _ = Trainer.build_optimizer(cfg, model)
    step = Trainer.build_train_step(cfg, model, itertools.repeat(synthetic_batch(cfg, batch_size)),
                                    optimizer)
    step.iter = 0
    return step


def device_synchronizer(device: str) -> Callable[[], None]:
    import torch

    if str(device).startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


def time_train_step(step, device: str, warmup: int = WARMUP_STEPS,
                    steps: int = MEASURED_STEPS) -> float:
    """Median seconds of the step (`median_step_seconds`) inside the event storage it logs to."""
    from fastreid.utils.events import EventStorage

    with EventStorage(0):
        return median_step_seconds(step.run_step, warmup, steps,
                                   synchronize=device_synchronizer(device))


def machine_description(device: str) -> str:
    """Where a timing was taken: GPU name, or CPU model, cores and torch's threads."""
    import torch

    threads = f"torch threads {torch.get_num_threads()}"
    if str(device).startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
        return f"GPU {name} ({torch.cuda.device_count()} visible), {threads}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle
                          if line.startswith("model name")), model)
    except OSError:
        pass
    return f"CPU {model}, {os.cpu_count()} cores, {threads}"


def probe_batch_size(cfg, device: str) -> int:
    """The configured batch on a GPU; 4 images on a CPU (an R152 batch of 64 takes minutes there)."""
    return cfg.SOLVER.IMS_PER_BATCH if str(device).startswith("cuda") else 4


def measure_seconds_per_iteration(row: Row, opts: Sequence[str], device: str,
                                  warmup: int = WARMUP_STEPS, steps: int = MEASURED_STEPS) -> float:
    """Seconds per training iteration of the row on this machine: the trainer's step, median of
    `steps` after `warmup`, at the probe batch, scaled linearly to the configured batch."""
    cfg = load_config(row.config, [*opts, "MODEL.DEVICE", device, "MODEL.BACKBONE.PRETRAIN",
                                   "False", "MODEL.HEADS.NUM_CLASSES", "8"])
    batch = probe_batch_size(cfg, device)
    seconds = time_train_step(fixed_batch_train_step(cfg, batch), device, warmup, steps)
    return seconds / batch * cfg.SOLVER.IMS_PER_BATCH


def dry_run(rows: Sequence[Row], output_root: str, opts: Sequence[str], num_gpus: int,
            launcher: str, device: str, measure: bool = True, gpus: str = "",
            warmup: int = WARMUP_STEPS, steps: int = MEASURED_STEPS) -> str:
    cache: Dict[tuple, float] = {}
    lines = []
    slots = gpu_slots(gpus, num_gpus) if gpus else []
    if slots:
        opts = [*opts, "MODEL.DEVICE", "cuda"]
        lines.append(f"# rows run side by side, one per GPU slot {slots} (CUDA_VISIBLE_DEVICES "
                     "per row); a dagger row starts after its R152 row")
    if measure:
        lines.append(f"# cost: the trainer's step, median of {steps} steps after {warmup} warm-up, "
                     f"on {machine_description(device)}")
    for row in rows:
        directory = output_dir(row, output_root)
        status = row_status(directory)
        command = train_command(row, output_root, opts, num_gpus, launcher,
                                resume=status == "interrupted")
        iterations = iterations_of(row, opts)
        cost = ""
        if row.evaluates:
            cost = f"  evaluation of {row.dataset}/{row.evaluates}'s final model (run that first)"
        elif measure:
            cfg = load_config(row.config, [*opts, "MODEL.DEVICE", "cpu"])
            key = (cfg.MODEL.META_ARCHITECTURE, cfg.MODEL.BACKBONE.DEPTH,
                   tuple(cfg.INPUT.SIZE_TRAIN), cfg.SOLVER.IMS_PER_BATCH, cfg.MODEL.REG.AT.ENABLED,
                   cfg.MODEL.REG.AT.STEPS, cfg.MODEL.REG.SGP.ENABLED, l2_term(cfg)[0])
            if key not in cache:
                cache[key] = measure_seconds_per_iteration(row, opts, device, warmup, steps)
            seconds = cache[key] * iterations / max(1, num_gpus)
            cost = (f"  ~{iterations} it x {cache[key]:.2f} s/it on this {device} "
                    f"= {seconds / 3600:.1f} h (estimate{' / ' + str(num_gpus) + ' GPUs' if num_gpus > 1 else ''})")
        lines.append(f"# {row.key} [{status}]{cost}\n{shlex.join(command)}")
    return "\n".join(lines)


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


def read_history(directory: str) -> List[dict]:
    path = os.path.join(directory, EVAL_HISTORY_FILE)
    if not os.path.isfile(path):
        return []
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def row_results(row: Row, output_root: str, opts: Sequence[str] = ()) -> dict:
    directory = output_dir(row, output_root)
    history = read_history(directory)
    if row.evaluates and os.path.isfile(os.path.join(directory, RESULTS_FILE)):
        with open(os.path.join(directory, RESULTS_FILE)) as handle:
            evaluated = json.load(handle)
        history = [{"epoch": -1, "mAP": evaluated["mAP"], "Rank-1": evaluated["Rank-1"]}]
    paper = PAPER_NUMBERS.get((row.dataset, row.name))
    result = {"dataset": row.dataset, "row": row.name, "status": row_status(directory),
              "paper_mAP": paper[0] if paper else None, "paper_R1": paper[1] if paper else None,
              "final_mAP": None, "final_R1": None, "best_mAP": None, "best_R1": None,
              "best_epoch": None}
    if not history:
        return result
    cfg = load_config(row.config, ["MODEL.DEVICE", "cpu", *opts])
    restart = cfg.SOLVER.EPOCH_LR.RESTART_EPOCH
    final = history[-1]
    result.update(final_mAP=final["mAP"], final_R1=final["Rank-1"])
    if row.evaluates:  # one evaluation of the final model: no "selected on test" column
        return result
    phase_b = [h for h in history if h["epoch"] > restart] or history
    best = max(phase_b, key=lambda h: h["mAP"])
    result.update(best_mAP=best["mAP"], best_R1=best["Rank-1"], best_epoch=best["epoch"])
    return result


def _cell(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_table(results: Sequence[dict]) -> str:
    header = ("| dataset | row | paper mAP / R1 | final mAP / R1 | best mAP / R1 (selected on test, "
              "epoch) | status |\n|---|---|---|---|---|---|")
    lines = [header]
    for r in results:
        best = f"{_cell(r['best_mAP'])} / {_cell(r['best_R1'])}"
        if r["best_epoch"] is not None:
            best += f" (ep {r['best_epoch']})"
        lines.append(f"| {r['dataset']} | {r['row']} | {_cell(r['paper_mAP'])} / "
                     f"{_cell(r['paper_R1'])} | {_cell(r['final_mAP'])} / {_cell(r['final_R1'])} | "
                     f"{best} | {r['status']} |")
    return "\n".join(lines)


def format_csv(results: Sequence[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(results[0].keys()))
    writer.writeheader()
    writer.writerows(results)
    return buffer.getvalue()


def write_table(results: Sequence[dict], output_root: str) -> List[str]:
    os.makedirs(output_root, exist_ok=True)
    markdown = os.path.join(output_root, TABLE_MARKDOWN)
    table = os.path.join(output_root, TABLE_CSV)
    with open(markdown, "w") as handle:
        handle.write(format_table(results) + "\n")
    with open(table, "w") as handle:
        handle.write(format_csv(results))
    return [markdown, table]


def collect_and_write(rows: Sequence[Row], output_root: str, opts: Sequence[str] = (),
                      draw_factors: bool = False):
    """The table of every row (finished or not), written as results.md / results.csv; with
    `draw_factors`, the factor pictures of every run that logged factors."""
    results = [row_results(row, output_root, opts) for row in rows]
    paths = write_table(results, output_root)
    if draw_factors:
        from adaptive_l2.plotting import plot_factors

        for row in rows:
            directory = output_dir(row, output_root)
            if os.path.isfile(os.path.join(directory, FACTORS_FILE)):
                paths += plot_factors(directory)
    return format_table(results), paths


# ---- Several seeds per row (--seeds): each row once per seed, mean +/- CI and paired differences

SEED_METRICS = (("final_mAP", "mAP"), ("final_R1", "Rank-1"))  # (result key, column label)


def seed_folder(seed: int) -> str:
    return f"seed{seed}"


def parse_seeds(text: str) -> List[int]:
    """'0,1,2,3,4' -> [0, 1, 2, 3, 4]; distinct integers >= 0, or a ValueError naming --seeds."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or any(not p.isdigit() for p in parts) or len(set(map(int, parts))) != len(parts):
        raise ValueError(
            f"--seeds must list distinct integers >= 0 such as 0,1,2,3,4, got '{text}'")
    return [int(p) for p in parts]


def seeded_rows(rows: Sequence[Row], seeds: Sequence[int]) -> List[Row]:
    """Every row once per seed, seed by seed (all rows of the first seed first), so a suite stopped
    early still has complete seeds to compare rows on."""
    return [dataclasses.replace(row, seed=seed) for seed in seeds for row in rows]


def seed_summaries(rows: Sequence[Row], seeds: Sequence[int], output_root: str,
                   reference: str, opts: Sequence[str] = ()) -> List[dict]:
    """Per row: the finished seeds' values of each metric, their mean +/- 95 % CI, and the paired
    difference to the row `reference` of the same dataset over the seeds both finished."""
    from adaptive_l2.intervals import mean_interval, paired_difference

    values: Dict[str, Dict[str, Dict[int, float]]] = {}
    for row in rows:
        per_metric: Dict[str, Dict[int, float]] = {key: {} for key, _ in SEED_METRICS}
        for seed in seeds:
            result = row_results(dataclasses.replace(row, seed=seed), output_root, opts)
            if result["status"] != "done":
                continue
            for key, _ in SEED_METRICS:
                if result[key] is not None:
                    per_metric[key][seed] = result[key]
        values[row.key] = per_metric
    summaries = []
    for row in rows:
        reference_key = f"{row.dataset}/{reference}"
        summary = {"dataset": row.dataset, "row": row.name, "reference": reference,
                   "seeds_done": len(values[row.key][SEED_METRICS[0][0]]), "seeds": len(seeds)}
        for key, _ in SEED_METRICS:
            mine = values[row.key][key]
            summary[key] = mean_interval(list(mine.values())) if mine else None
            theirs = values.get(reference_key, {}).get(key, {})
            common = [s for s in seeds if s in mine and s in theirs]
            summary[f"{key}_values"] = [mine[s] for s in seeds if s in mine]
            summary[f"{key}_vs_reference"] = (
                None if row.name == reference or not common else
                paired_difference([mine[s] for s in common], [theirs[s] for s in common]))
        summaries.append(summary)
    return summaries


def _interval_cell(interval, signed: bool = False) -> str:
    if interval is None:
        return "-"
    cell = interval.format(1, signed)
    if interval.p_value is not None:
        cell += f" (p {interval.p_value:.2g})"
    return cell


def format_seed_table(summaries: Sequence[dict]) -> str:
    """Markdown: mean +/- 95 % CI (Student t, n - 1 dof) per metric, then each row's paired
    difference to the reference row (paired t over the seeds both finished, two-sided p)."""
    if not summaries:
        return "(no rows)"
    reference = summaries[0]["reference"]
    labels = [label for _, label in SEED_METRICS]
    header = (["dataset", "row", "seeds"] + [f"{label} (mean ± 95 % CI)" for label in labels]
              + [f"Δ {label} vs {reference} (paired)" for label in labels])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summaries:
        cells = [s["dataset"], s["row"], f"{s['seeds_done']}/{s['seeds']}"]
        cells += [_interval_cell(s[key]) for key, _ in SEED_METRICS]
        cells += ["reference" if s["row"] == reference else
                  _interval_cell(s[f"{key}_vs_reference"], signed=True) for key, _ in SEED_METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_seed_csv(summaries: Sequence[dict]) -> str:
    """One line per row: per metric its seeds' values, mean, CI bounds, and the paired difference
    to the reference row with its CI and p-value (empty where undefined)."""
    def number(value):
        return "" if value is None else f"{value:.6g}"

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    header = ["dataset", "row", "reference", "seeds_done", "seeds"]
    for key, _ in SEED_METRICS:
        header += [f"{key}_values", f"{key}_mean", f"{key}_ci_low", f"{key}_ci_high",
                   f"{key}_diff_mean", f"{key}_diff_ci_low", f"{key}_diff_ci_high", f"{key}_diff_p"]
    writer.writerow(header)
    for s in summaries:
        line = [s["dataset"], s["row"], s["reference"], s["seeds_done"], s["seeds"]]
        for key, _ in SEED_METRICS:
            own, diff = s[key], s[f"{key}_vs_reference"]
            line += [";".join(f"{v:.6g}" for v in s[f"{key}_values"])]
            line += [number(own.mean if own else None), number(own.low if own else None),
                     number(own.high if own else None)]
            line += [number(diff.mean if diff else None), number(diff.low if diff else None),
                     number(diff.high if diff else None), number(diff.p_value if diff else None)]
        writer.writerow(line)
    return buffer.getvalue()


def collect_seeds_and_write(rows: Sequence[Row], seeds: Sequence[int], output_root: str,
                            reference: str, opts: Sequence[str] = (),
                            draw_factors: bool = False) -> Tuple[str, List[str]]:
    """The multi-seed table of `rows` (unseeded) written as results_seeds.md / .csv in the root;
    with `draw_factors`, the factor pictures of every seed's run that logged factors."""
    summaries = seed_summaries(rows, seeds, output_root, reference, opts)
    os.makedirs(output_root, exist_ok=True)
    table = format_seed_table(summaries)
    markdown = os.path.join(output_root, TABLE_SEEDS_MARKDOWN)
    comma = os.path.join(output_root, TABLE_SEEDS_CSV)
    with open(markdown, "w") as handle:
        handle.write(table + "\n")
    with open(comma, "w") as handle:
        handle.write(format_seed_csv(summaries))
    paths = [markdown, comma]
    if draw_factors:
        from adaptive_l2.plotting import plot_factors

        for row in seeded_rows(rows, seeds):
            directory = output_dir(row, output_root)
            if os.path.isfile(os.path.join(directory, FACTORS_FILE)):
                paths += plot_factors(directory)
    return table, paths
