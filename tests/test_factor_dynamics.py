"""What a run logs about its adaptive factors: a tensorboard histogram per kind, and every theta's
summed learning rate, from which the plot draws the prediction theta_0 - sum(lr)."""
import json
import os

import numpy as np
import pytest
from conftest import SYNTHETIC_BASE, run_train_net, tiny_opts

from adaptive_l2.plotting import plot_factors, read_factor_log, theta_predictions

FREEZE_ITERS = 2


@pytest.fixture(scope="module")
def adaptive_run(dataset_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("dynamics")
    run_train_net(["--config-file", SYNTHETIC_BASE, *tiny_opts(
        dataset_root, out, "MODEL.REG.NAME", "adaptive", "MODEL.REG.THETA_LR_SCALE", "10.0",
        "MODEL.FREEZE_LAYERS", '["backbone"]', "SOLVER.FREEZE_ITERS", str(FREEZE_ITERS),
        "SOLVER.ITERS_PER_EPOCH", "3")])
    return str(out)


def test_tensorboard_holds_a_histogram_of_factors_and_thetas_per_kind(adaptive_run):
    from tensorboard.backend.event_processing.event_accumulator import (HISTOGRAMS,
                                                                        EventAccumulator)

    last = read_factor_log(adaptive_run)[-1]
    kinds = np.array(last["kinds"])
    accumulator = EventAccumulator(adaptive_run, size_guidance={HISTOGRAMS: 0})
    accumulator.Reload()
    tags = set(accumulator.Tags()["histograms"])
    assert set(kinds) == {"kernel", "norm_weight", "norm_bias"}  # ResNet: no conv biases
    for kind in set(kinds):
        assert {f"l2_factors/{kind}", f"l2_thetas/{kind}"} <= tags
        final = accumulator.Histograms(f"l2_factors/{kind}")[-1]
        factors = np.array(last["factors"])[kinds == kind]
        assert final.step == last["iteration"]
        assert final.histogram_value.num == len(factors)
        assert final.histogram_value.max == pytest.approx(factors.max(), rel=1e-6)
        assert final.histogram_value.min == pytest.approx(factors.min(), rel=1e-6)


def test_prediction_is_theta_0_minus_the_cumulative_sum_of_logged_lrs(adaptive_run):
    with open(os.path.join(adaptive_run, "metrics.json")) as handle:
        logged = {r["iteration"]: r["l2_theta_lr"] for r in map(json.loads, handle)
                  if "l2_theta_lr" in r}
    assert sorted(logged) == list(range(6))  # LOG_PERIOD 1: every iteration's lr
    lrs = np.array([logged[i] for i in range(6)])
    assert len(set(lrs.round(12))) > 2  # warm-up and a step: the lr changes

    records = read_factor_log(adaptive_run)
    iterations, thetas, predictions = theta_predictions(records)
    names = records[-1]["names"]
    backbone = np.array([n.startswith("backbone") for n in names])
    assert 0 < backbone.sum() < len(names)
    for record, prediction in zip(records, np.array(predictions)):
        done = record["iteration"]  # steps taken (the first record: before any step)
        head_sum = lrs[:done].sum()
        backbone_sum = lrs[FREEZE_ITERS:done].sum()  # frozen for the first steps
        start = np.array(thetas[0])
        assert np.allclose(prediction[~backbone], start[~backbone] - head_sum, rtol=0, atol=1e-9)
        assert np.allclose(prediction[backbone], start[backbone] - backbone_sum, rtol=0, atol=1e-9)
    # and the thetas do follow it: torch's Adam moves a theta by about its lr each step (the
    # gradient 0.2 A ||W||^2 is far above eps for the kernels), none while frozen. (Keras's global
    # step count, SOLVER.ADAM_GLOBAL_STEP, would not: a tensor unfrozen at step t > 1 starts with
    # a bias correction for t steps on moments of fewer.)
    final_theta, final_prediction = np.array(thetas[-1]), np.array(predictions[-1])
    kernels = np.array(records[-1]["kinds"]) == "kernel"
    assert np.allclose(final_theta[kernels], final_prediction[kernels], atol=0.15 * lrs.sum())
    frozen_record = np.array(thetas[0])  # epoch -1: before any step
    assert (final_theta[kernels].max()
            < frozen_record[kernels].max() - 0.5 * lrs[FREEZE_ITERS:].sum())


def test_plot_draws_the_dynamics_figure(adaptive_run, tmp_path):
    paths = plot_factors(adaptive_run, str(tmp_path))
    assert [os.path.basename(p) for p in paths] == [
        "factor_histogram.png", "factor_trajectories.png", "factor_dynamics.png"]
    assert all(os.path.getsize(p) > 10_000 for p in paths)


@pytest.mark.parametrize("log_period", [1, 3])
def test_resumed_run_continues_the_summed_learning_rates(dataset_root, tmp_path, log_period):
    """From the checkpoint: with LOG_PERIOD 3 the log's last record before the resumed
    checkpoint is iteration 0, so sums read back from the log would fall short."""
    from conftest import tiny_cfg

    from adaptive_l2.trainer import Trainer

    def last_sums(out):
        return read_factor_log(str(out))[-1]["theta_lr_sum"]

    sums = {}
    for name in ("whole", "resumed"):
        out = tmp_path / name
        cfg = tiny_cfg(dataset_root, out, "MODEL.REG.NAME", "adaptive", "SOLVER.MAX_EPOCH", "3",
                       "TEST.EVAL_PERIOD", "3", "MODEL.REG.LOG_PERIOD", str(log_period))
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
        if name == "resumed":  # killed during the last epoch, resumed from the epoch-2 checkpoint
            os.remove(out / "model_final.pth")
            (out / "last_checkpoint").write_text("model_0001.pth")
            trainer = Trainer(cfg)
            trainer.resume_or_load(resume=True)
            assert trainer.start_epoch == 2
            trainer.train()
        sums[name] = last_sums(out)
        # epoch -1, 0, 1, 2 (or -1 and the last) each once
        assert len(read_factor_log(str(out))) == (4 if log_period == 1 else 2)
    assert max(sums["whole"]) > 0 and sums["resumed"] == pytest.approx(sums["whole"], rel=1e-12)


def test_keras_step_ratio_is_what_keras_adam_does_after_a_frozen_phase():
    """benchmarks/theta_fall.py's explanation of the study's backbone thetas falling faster than
    sum(lr): KerasAdam's step on a steady gradient first seen at global step t0 + 1."""
    import sys

    import torch
    from conftest import REPO

    from adaptive_l2.keras_adam import KerasAdam

    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from theta_fall import keras_step_ratio

    lr, t0 = 1e-3, 64
    late, early = torch.nn.Parameter(torch.zeros(())), torch.nn.Parameter(torch.zeros(()))
    optimizer = KerasAdam([late, early], lr=lr, eps=0.0)
    for t in range(1, t0 + 21):
        before = late.item(), early.item()
        early.grad = torch.tensor(0.5)
        late.grad = torch.tensor(0.5) if t > t0 else None  # frozen: no gradient, no step
        optimizer.step()
        assert before[1] - early.item() == pytest.approx(lr, rel=1e-5)  # trained from step 1
        if t > t0:
            assert before[0] - late.item() == pytest.approx(lr * keras_step_ratio(t - t0, t),
                                                            rel=1e-5)
    assert keras_step_ratio(1, 65) == pytest.approx(0.794, abs=1e-3)
    assert keras_step_ratio(10, 74) == pytest.approx(1.74, abs=1e-2)
    assert keras_step_ratio(10, 4010) == pytest.approx(6.46, abs=1e-2)
