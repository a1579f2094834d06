"""The table tool's cost estimate (the dry run): the median of timed steps of the trainer's own
step."""
import os

import pytest
import torch
from conftest import REPO

from adaptive_l2.config import load_config
from adaptive_l2.table import cost
from adaptive_l2.table.cost import median_step_seconds
from adaptive_l2.table.suite import Row
from adaptive_l2.trainer import Trainer


def test_median_of_timed_steps_skips_warmup_and_outliers():
    durations = iter([50.0, 40.0, 3.0, 1.0, 90.0, 2.0, 4.0, 80.0, 2.5])  # 2 warm-up, 7 timed
    now = [0.0]
    calls = []

    def step():
        calls.append(1)
        now[0] += next(durations)

    median = median_step_seconds(step, warmup=2, steps=7, clock=lambda: now[0])
    assert median == 3.0  # median of 3, 1, 90, 2, 4, 80, 2.5; the fastest (1) would say 1.0
    assert len(calls) == 9
    with pytest.raises(ValueError, match="steps >= 1"):
        median_step_seconds(step, warmup=0, steps=0)


def test_cost_is_timed_on_the_trainers_own_step(monkeypatch):
    """The dry run's step is Trainer.build_train_step's (AT included), and it trains."""
    tiny = ["MODEL.DEVICE", "cpu", "INPUT.SIZE_TRAIN", "[64,32]", "MODEL.HEADS.NUM_CLASSES", "8",
            "MODEL.REG.AT.ENABLED", "True"]
    cfg = load_config(os.path.join(REPO, "configs", "Synthetic", "baseline.yml"), tiny)
    torch.manual_seed(0)
    step = cost.fixed_batch_train_step(cfg, 4)
    assert type(step) is Trainer.train_step_class and step.adversarial is not None
    before = [p.detach().clone() for p in step.model.parameters()]
    seconds = cost.time_train_step(step, "cpu", warmup=0, steps=1)
    assert 0 < seconds < 60
    assert all(not torch.equal(a, p) for a, p in zip(before, step.model.parameters())
               if p.requires_grad and p.dim() > 1)

    timed = []
    monkeypatch.setattr(cost, "time_train_step",
                        lambda step, device, warmup, steps: timed.append((step, warmup, steps)) or 2.0)
    row = Row("Synthetic", "at", os.path.join(REPO, "configs", "Synthetic", "at.yml"))
    per_iteration = cost.measure_seconds_per_iteration(row, tiny[2:4], "cpu", 2, 5)
    assert per_iteration == 2.0 / 4 * cfg.SOLVER.IMS_PER_BATCH  # probe batch 4 on a CPU, scaled
    assert timed[0][1:] == (2, 5) and timed[0][0].adversarial is not None
