"""Learning-rate schedules beyond fast-reid's: the paper's per-epoch table with a phase restart."""
from __future__ import annotations

from typing import Sequence

import torch
from fastreid.solver.build import build_lr_scheduler as fastreid_build_lr_scheduler

EPOCH_TABLE = "EpochTableLR"


def epoch_table_lr(epoch: int, *, base_lr: float, start_lr: float, warmup_epochs: int,
                   milestones: Sequence[int], gamma: float, restart_epoch: int) -> float:
    """The learning rate of `epoch`, set once per epoch (Ni et al.'s Keras schedule).

    Linear warm-up from start_lr to base_lr over epochs 0 .. warmup_epochs - 1, then base_lr,
    multiplied by gamma at each milestone. From `restart_epoch` on (the start of phase B when
    > 0) the table starts again from epoch 0.
    """
    if restart_epoch > 0 and epoch >= restart_epoch:
        epoch -= restart_epoch
    if epoch < warmup_epochs:
        if warmup_epochs == 1:
            return base_lr
        return start_lr + (base_lr - start_lr) / (warmup_epochs - 1) * epoch
    return base_lr * gamma ** sum(1 for m in milestones if epoch >= m)


class EpochTableLR(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR over epochs: fast-reid's LRScheduler hook steps `lr_sched` after every epoch."""

    def __init__(self, optimizer, *, base_lr: float, start_lr: float, warmup_epochs: int,
                 milestones: Sequence[int], gamma: float, restart_epoch: int):
        self.table = dict(base_lr=base_lr, start_lr=start_lr, warmup_epochs=warmup_epochs,
                          milestones=list(milestones), gamma=gamma, restart_epoch=restart_epoch)
        super().__init__(optimizer, lambda epoch: epoch_table_lr(epoch, **self.table) / base_lr)


def build_lr_scheduler(cfg, optimizer, iters_per_epoch: int) -> dict:
    if cfg.SOLVER.SCHED != EPOCH_TABLE:
        return fastreid_build_lr_scheduler(cfg, optimizer, iters_per_epoch)
    if cfg.SOLVER.WARMUP_ITERS > 0 or cfg.SOLVER.DELAY_EPOCHS > 0:
        raise ValueError("SOLVER.SCHED EpochTableLR holds its own warm-up: set SOLVER.WARMUP_ITERS "
                         "and SOLVER.DELAY_EPOCHS to 0")
    table = cfg.SOLVER.EPOCH_LR
    return {"lr_sched": EpochTableLR(
        optimizer, base_lr=cfg.SOLVER.BASE_LR, start_lr=table.START_LR,
        warmup_epochs=table.WARMUP_EPOCHS, milestones=table.MILESTONES, gamma=table.GAMMA,
        restart_epoch=table.RESTART_EPOCH)}
