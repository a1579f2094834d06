"""Tests of the training step's hot path: no host syncs, the same logged values, and the
ordered step regularizers."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import adaptive_l2  # noqa: F401  (compat patches before fast-reid imports)
from adaptive_l2.regularizers.step import StepRegularizer
from adaptive_l2.trainer import TrainStep
from fastreid.engine.train_loop import SimpleTrainer
from fastreid.utils.events import EventStorage

from step_helpers import SyncCounter, build_step, run_steps, step_config


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny models on a shared 2-core machine: one thread is several times faster than two
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("meta_architecture, extra", [
    ("Baseline", ["MODEL.REG.SGP.ENABLED", "True"]),  # SGP-F
    ("TwoBranchReID", ["MODEL.REG.SGP.ENABLED", "True", "MODEL.REG.SGP.MODE", "parameter"]),
    ("Baseline", ["MODEL.REG.AT.ENABLED", "True"]),
], ids=["baseline-sgp_f", "two_branch-sgp_p", "baseline-at"])
def test_training_steps_never_wait_for_the_device(meta_architecture, extra):
    step = build_step(step_config(meta_architecture, *extra))
    with EventStorage(0) as storage:
        run_steps(step, storage, [0])  # first step: optimizer state, layouts, generators
        counter = SyncCounter()
        with counter:
            run_steps(step, storage, [1, 2])
        assert counter.syncs == [], "\n".join(counter.syncs)
        # what was logged is there when read, at the iterations it belongs to
        history = storage.history("total_loss").values()
        assert [iteration for _, iteration in history] == [0, 1, 2]
        assert all(math.isfinite(value) for value, _ in history)
        if "MODEL.REG.SGP.ENABLED" in extra:
            relative = storage.history("sgp_relative_perturbation").latest()
            assert relative == pytest.approx(0.1, rel=0.2)


class HostMetricsTrainStep(TrainStep):
    """TrainStep with fast-reid's own per-step `.item()` metrics, as the reference."""

    _write_metrics = SimpleTrainer._write_metrics


@pytest.mark.parametrize("meta_architecture", ["Baseline", "TwoBranchReID"])
def test_logged_values_equal_fastreids_per_step_values(meta_architecture):
    cfg = step_config(meta_architecture, "MODEL.REG.SGP.ENABLED", "True")
    logged = []
    for step_class in (None, HostMetricsTrainStep):
        step = build_step(cfg, step_class)
        with EventStorage(0) as storage:
            run_steps(step, storage, range(3))
            histories = {name: buffer.values() for name, buffer in storage.histories().items()}
            # data_time is a wall-clock time: only when it was logged can be compared
            times = histories.pop("data_time")
            assert [iteration for _, iteration in times] == [0, 1, 2]
            smoothed = storage.latest_with_smoothing_hint(2)
            smoothed.pop("data_time")
            logged += [histories, smoothed]
    deferred, deferred_smoothed, host, host_smoothed = logged
    assert deferred == host and deferred_smoothed == host_smoothed
    assert {"total_loss", "sgp_relative_perturbation"} <= set(host)
    model_losses = {"loss_cls", "loss_triplet"} if meta_architecture == "Baseline" else \
        {"loss_global_ce", "loss_global_triplet", "loss_stripe2_ce", "loss_stripe2_triplet"}
    assert model_losses <= set(host)


class NonFiniteAtIteration(nn.Module):
    def __init__(self, bad_iteration: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3))
        self.bad_iteration = bad_iteration
        self.calls = 0

    def forward(self, batch):
        scale = float("nan") if self.calls == self.bad_iteration else 1.0
        self.calls += 1
        return {"loss_a": (self.weight * batch).sum() * scale, "loss_b": self.weight.pow(2).sum()}


def test_a_non_finite_loss_is_reported_at_the_next_read_naming_its_iteration():
    model = NonFiniteAtIteration(bad_iteration=1)
    step = TrainStep(model, itertools.repeat(torch.ones(3)),
                     torch.optim.SGD(model.parameters(), lr=0.1))
    with EventStorage(0) as storage:
        run_steps(step, storage, range(3))
        with pytest.raises(FloatingPointError, match="iteration=1"):
            storage.latest()


class RecordingRegularizer(StepRegularizer):
    """Records when the step calls it, and the gradient it sees after the backward."""

    def __init__(self, name: str, calls: list, replaces_forward: bool = False) -> None:
        self.name, self.calls, self.replaces_forward = name, calls, replaces_forward

    def before_step(self, iteration: int) -> None:
        self.calls.append((self.name, "before_step", iteration))

    def losses(self, model, data):
        self.calls.append((self.name, "losses"))
        return {"loss_doubled": 2 * (model.weight * data).sum()}

    def after_backward(self, step) -> None:
        self.calls.append((self.name, "after_backward", step.model.weight.grad.tolist()))


class LinearLoss(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2))

    def forward(self, batch):
        return {"loss": (self.weight * batch).sum()}


def test_step_regularizers_run_in_order_around_the_backward():
    model, calls = LinearLoss(), []
    regularizers = [RecordingRegularizer("first", calls, replaces_forward=True),
                    RecordingRegularizer("second", calls)]
    step = TrainStep(model, itertools.repeat(torch.tensor([1.0, 3.0])),
                     torch.optim.SGD(model.parameters(), lr=0.5), regularizers=regularizers)
    with EventStorage(0) as storage:
        run_steps(step, storage, [7])
        assert storage.history("total_loss").latest() == 8.0  # the first one's losses: 2 x (1 + 3)
    assert calls == [("first", "before_step", 7), ("second", "before_step", 7),
                     ("first", "losses"),
                     ("first", "after_backward", [2.0, 6.0]),
                     ("second", "after_backward", [2.0, 6.0])]
    assert model.weight.tolist() == [0.0, -2.0]  # the optimizer stepped after both


def test_two_step_regularizers_computing_the_losses_are_refused():
    model = LinearLoss()
    both = [RecordingRegularizer(name, [], replaces_forward=True) for name in ("a", "b")]
    with pytest.raises(ValueError, match="more than one step regularizer"):
        TrainStep(model, itertools.repeat(torch.ones(2)),
                  torch.optim.SGD(model.parameters(), lr=0.1), regularizers=both)
