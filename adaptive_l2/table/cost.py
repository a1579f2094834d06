"""The dry run: each row's command and its cost, timed with the trainer's own training step
(Trainer.build_train_step fed one fixed batch, so the penalty, SGP, AT and AMP are the ones
training runs), the median of several steps, on a machine this module describes."""
from __future__ import annotations

import itertools
import os
import platform
import shlex
import statistics
import time
from typing import Callable, Dict, Sequence

from adaptive_l2.config import l2_term, load_config
from adaptive_l2.table.runner import gpu_slots, train_command
from adaptive_l2.table.suite import Row, iterations_of, output_dir, row_status

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
    """What waits for queued work on `device` (nothing on a CPU), so a timed step is complete."""
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
    """Each row's command and status, and its cost: iterations x the measured seconds per
    iteration (measured once per distinct model, batch and regularizer), or none with
    `measure=False`."""
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
