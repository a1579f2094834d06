#!/usr/bin/env python3
"""How far an adaptive theta falls over a config's schedule, if Adam moves it by its learning rate
each step (a steady penalty gradient, large against eps): the prediction theta_0 - sum(lr) that
factor_dynamics.png draws, and the same under Keras's global step count (SOLVER.ADAM_GLOBAL_STEP).

Keras corrects the bias of every tensor's moments with the GLOBAL step t. A tensor frozen for the
first t0 steps (phase A) has moments only k = t - t0 steps old, so for a steady gradient its step
is lr * (1 - b1^k) * sqrt(1 - b2^t) / ((1 - b1^t) * sqrt(1 - b2^k)) instead of lr: 0.79 at
k = 1, 1.7 at k = 10 for t0 = 64 (the study), 3.1 and 6.5 for t0 = 4000 (the paper). A tensor
trained from step 1 (k = t) moves by lr either way.

  python benchmarks/theta_fall.py configs/Study/adaptive.yml \
      configs/Paper/Market1501/adaptive_l2_R50.yml

Needs SOLVER.SCHED EpochTableLR (the learning rate is constant within an epoch).
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Dict, List, Optional

from adaptive_l2.config import load_config
from adaptive_l2.solver import EPOCH_TABLE, epoch_table_lr


def keras_step_ratio(k: int, t: int, beta1: float = 0.9, beta2: float = 0.999) -> float:
    """Keras Adam's step / lr at global step t for a steady gradient first seen k steps ago."""
    keras_correction = math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
    return keras_correction * (1 - beta1 ** k) / math.sqrt(1 - beta2 ** k)


def theta_falls(cfg) -> Dict[str, float]:
    """Summed theta learning rate of phase A and B, and the Keras-corrected fall over phase B of a
    tensor frozen in phase A."""
    if cfg.SOLVER.SCHED != EPOCH_TABLE:
        raise ValueError(f"SOLVER.SCHED must be {EPOCH_TABLE} (got {cfg.SOLVER.SCHED})")
    table = cfg.SOLVER.EPOCH_LR
    per_epoch = cfg.SOLVER.ITERS_PER_EPOCH
    if per_epoch <= 0:
        raise ValueError("SOLVER.ITERS_PER_EPOCH must be set (> 0)")
    frozen_iters = cfg.SOLVER.FREEZE_ITERS
    scale = cfg.MODEL.REG.THETA_LR_SCALE
    sums = {"phase_a": 0.0, "phase_b": 0.0, "phase_b_keras": 0.0}
    for epoch in range(cfg.SOLVER.MAX_EPOCH):
        lr = scale * epoch_table_lr(epoch, base_lr=cfg.SOLVER.BASE_LR, start_lr=table.START_LR,
                                    warmup_epochs=table.WARMUP_EPOCHS, milestones=table.MILESTONES,
                                    gamma=table.GAMMA, restart_epoch=table.RESTART_EPOCH)
        for i in range(per_epoch):
            t = epoch * per_epoch + i + 1  # the global step count after this step
            if t <= frozen_iters:
                sums["phase_a"] += lr
                continue
            sums["phase_b"] += lr
            sums["phase_b_keras"] += lr * keras_step_ratio(t - frozen_iters, t)
    return sums


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", help="config files with SOLVER.SCHED EpochTableLR")
    args = parser.parse_args(argv)
    print("| config | sum lr phase A | sum lr phase B | phase B under Keras's global step (frozen "
          "in A) |\n|---|---|---|---|")
    for path in args.configs:
        sums = theta_falls(load_config(path, ["MODEL.DEVICE", "cpu"]))
        print(f"| {path} | {sums['phase_a']:.3f} | {sums['phase_b']:.3f} | "
              f"{sums['phase_b_keras']:.3f} (x{sums['phase_b_keras'] / sums['phase_b']:.3f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
