"""Tests of the training step's hot path: no host syncs, the same logged values, fp32 where fp16
breaks (fast-reid's triplet distances), and the compat patches this needs."""
from __future__ import annotations

import itertools
import math
import os
import sys
import traceback
from typing import Dict, List

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import adaptive_l2  # noqa: F401  (compat patches before fast-reid imports)
from adaptive_l2 import compat
from adaptive_l2.config import load_config
from adaptive_l2.regularizers.sgp import ParameterGradientPerturbation
from adaptive_l2.trainer import Trainer, TrainStep
from fastreid.engine.train_loop import SimpleTrainer
from fastreid.utils.events import EventStorage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 8  # P2 x K4
NUM_CLASSES = 4

_SYNC_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default,
             torch.ops.aten.is_nonzero.default}
# Adam's step counters live on the host even when the parameters are on a GPU (torch keeps
# state["step"] on the CPU unless capturable / fused): reading them waits for no device.
_HOST_ONLY_FILES = (os.sep + os.path.join("torch", "optim") + os.sep,)


class SyncCounter(TorchDispatchMode):
    """Records every op that copies a tensor value to Python (a host sync on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _SYNC_OPS:
            frames = traceback.extract_stack()[:-1]
            if not any(part in frame.filename for frame in frames for part in _HOST_ONLY_FILES):
                caller = next((f for f in reversed(frames) if "torch" + os.sep not in f.filename
                               or "site-packages" + os.sep + "fastreid" in f.filename), frames[-1])
                self.syncs.append(f"{func} at {caller.filename}:{caller.lineno} {caller.line}")
        return func(*args, **(kwargs or {}))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny models on a shared 2-core machine: one thread is several times faster than two
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def step_config(meta_architecture: str, *extra: str):
    base = "Paper/Base-Paper.yml" if meta_architecture == "TwoBranchReID" else "Base-ReID.yml"
    return load_config(os.path.join(REPO, "configs", base), [
        "MODEL.DEVICE", "cpu", "MODEL.BACKBONE.DEPTH", "18x", "MODEL.BACKBONE.FEAT_DIM", "512",
        "MODEL.BACKBONE.STRIDE_IN_1X1", "False",  # R18 has no bottleneck
        "MODEL.BACKBONE.PRETRAIN", "False", "MODEL.HEADS.NUM_CLASSES", str(NUM_CLASSES),
        "MODEL.TWO_BRANCH.REGIONAL_DIM", "32", "MODEL.FREEZE_LAYERS", "[]",
        "MODEL.REG.NAME", "adaptive", "SOLVER.AMP.ENABLED", "False", "SEED", "0", *extra])


def synthetic_batch(seed: int = 0) -> Dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"images": torch.rand(BATCH, 3, 64, 32, generator=generator) * 255,
            "targets": torch.arange(BATCH) // 4,
            "camids": torch.zeros(BATCH, dtype=torch.long)}


def build_step(cfg, step_class=None) -> TrainStep:
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    optimizer, _ = Trainer.build_optimizer(cfg, model)
    step = Trainer.build_train_step(cfg, model, itertools.repeat(synthetic_batch()), optimizer)
    if step_class is not None:
        step.__class__ = step_class
    return step


def run_steps(step: TrainStep, storage: EventStorage, iterations) -> None:
    for iteration in iterations:
        storage.iter = step.iter = iteration
        step.run_step()


# ---------------------------------------------------------------- no host syncs per step


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


# ---------------------------------------------------------------- compat: deferred scalars


def test_tensor_scalars_are_put_without_a_sync_and_read_as_the_hosts_floats():
    values = torch.linspace(0.1, 2.0, 12, dtype=torch.float32).reshape(6, 2).sqrt()
    deferred, immediate = EventStorage(5), EventStorage(5)
    counter = SyncCounter()
    for row in values:
        with counter, deferred.name_scope("scope"):
            deferred.put_scalar("a", row[0])
            deferred.put_scalars(b=row[1], smoothing_hint=False)
        with immediate.name_scope("scope"):
            immediate.put_scalar("a", float(row[0]))
            immediate.put_scalars(b=float(row[1]), smoothing_hint=False)
        deferred.step()
        immediate.step()
    assert counter.syncs == []
    assert deferred.latest() == immediate.latest()
    assert deferred.latest_with_smoothing_hint(3) == immediate.latest_with_smoothing_hint(3)
    assert deferred.smoothing_hints() == immediate.smoothing_hints()
    assert {k: v.values() for k, v in deferred.histories().items()} == \
        {k: v.values() for k, v in immediate.histories().items()}
    assert deferred.iter == 11
    with pytest.raises(ValueError, match="'c'"):
        deferred.put_scalar("c", torch.zeros(2))


# ---------------------------------------------------------------- compat: Baseline targets


def test_baseline_precise_bn_targets_train_without_touching_the_callers_batch():
    step = build_step(step_config("Baseline"))
    batch = synthetic_batch()
    batch["targets"] = torch.full((BATCH,), -1)  # what fast-reid's PreciseBN hook feeds
    with EventStorage(0):
        losses = step.model(batch)
    assert torch.equal(batch["targets"], torch.full((BATCH,), -1))  # the host zeroed it in place
    assert all(math.isfinite(value.item()) for value in losses.values())
    with pytest.raises(ValueError, match="targets"):
        step.model({"images": batch["images"]})


# ---------------------------------------------------------------- compat: fp32 triplet distances


def test_fastreid_triplet_distances_are_fp32_under_fp16_autocast(monkeypatch):
    from fastreid.modeling.meta_arch import baseline

    triplet_module = sys.modules["fastreid.modeling.losses.triplet_loss"]
    host_mining = triplet_module.hard_example_mining
    seen: List[torch.Tensor] = []

    def spy(dist_mat, is_pos, is_neg):
        seen.append(dist_mat.detach())
        return host_mining(dist_mat, is_pos, is_neg)

    monkeypatch.setattr(triplet_module, "hard_example_mining", spy)
    generator = torch.Generator().manual_seed(0)
    embedding = torch.rand(32, 512, generator=generator) * 2  # post-ReLU pooled features
    targets = torch.arange(32) // 4
    reference = baseline.triplet_loss(embedding, targets, 0.3, False, True)
    with torch.autocast("cpu", dtype=torch.float16):
        under_amp = baseline.triplet_loss(embedding, targets, 0.3, False, True)
    fp32, amp = seen
    assert amp.dtype == torch.float32
    torch.testing.assert_close(amp, fp32, rtol=1e-5, atol=1e-5)
    same = targets[:, None] == targets[None, :]
    assert torch.equal(amp.masked_fill(~same, -1).argmax(1), fp32.masked_fill(~same, -1).argmax(1))
    assert torch.equal(amp.masked_fill(same, 1e9).argmin(1), fp32.masked_fill(same, 1e9).argmin(1))
    assert under_amp.item() == pytest.approx(reference.item(), rel=1e-6)


# ---------------------------------------------------------------- SGP-P batched over tensors


def test_sgp_p_scales_each_tensor_by_its_own_norm():
    generator = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.zeros(shape)) for shape in ((64, 32), (500,), (8, 4, 3, 3))]
    for param, size in zip(params, (1e-4, 1.0, 1e3)):
        param.grad = torch.randn(param.shape, generator=generator) * size
    before = [p.grad.clone() for p in params]
    ParameterGradientPerturbation(alpha=0.3, seed=0).apply(params)
    for param, old in zip(params, before):
        relative = ((param.grad - old).norm() / old.norm()).item()
        assert relative == pytest.approx(0.3, rel=0.15)


def test_sgp_p_runs_a_constant_number_of_ops_whatever_the_number_of_tensors():
    class OpCounter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += not func.is_view  # views of the noise buffer launch nothing
            return func(*args, **(kwargs or {}))

    counts = []
    for num_tensors in (10, 400):
        params = [nn.Parameter(torch.zeros(5, 3)) for _ in range(num_tensors)]
        for param in params:
            param.grad = torch.ones(5, 3)
        sgp = ParameterGradientPerturbation(alpha=0.1, seed=0)
        sgp.apply(params)  # layout cached at the first call
        with OpCounter() as counter:
            sgp.apply(params)
        counts.append(counter.count)
    # views of the one noise buffer are counted too (one per tensor), kernels are not per tensor
    assert counts[1] - counts[0] <= 2 * (400 - 10)
    assert counts[0] < 80
