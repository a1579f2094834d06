"""Nothing lost, nothing hangs: torn checkpoints, full disks, two runs in one folder, resumed runs
that keep their best model, diverging runs that stop."""
import errno
import json
import logging
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import SYNTHETIC_BASE, TRAIN_NET, REPO, run_train_net, tiny_cfg, tiny_opts
from torch import nn

from adaptive_l2 import checkpoint as checkpoint_module
from adaptive_l2.checkpoint import CheckpointReadError, CheckpointWriteError, SafeCheckpointer
from adaptive_l2.data.synthetic import dataset_folder_name, generate_synthetic_market
from adaptive_l2.run_lock import (RUN_LOCK_FILE, FinishedRunError, FolderBusyError,
                                  claim_output_dir)


def _checkpointer(folder, seed=0):
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return SafeCheckpointer(model, str(folder), optimizer=optimizer)


def test_torn_or_empty_checkpoints_resume_from_the_newest_intact_one(tmp_path, caplog):
    saver = _checkpointer(tmp_path)
    saver.save("model_0000", epoch=0, metric=1.0)
    saver.save("model_0001", epoch=1, metric=2.0)
    saver.save("model_0002", epoch=2, metric=3.0)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0002.pth"
    with open(tmp_path / "model_0002.pth", "r+b") as handle:
        handle.truncate(300)  # killed while writing (before atomic writes)
    (tmp_path / "model_0001.pth").write_bytes(b"")
    (tmp_path / "last_checkpoint").write_text("")

    resumer = _checkpointer(tmp_path, seed=1)
    with caplog.at_level(logging.WARNING, logger="adaptive_l2.checkpoint"):
        extra = resumer.resume_or_load("", resume=True)
    assert extra["epoch"] == 0
    assert torch.equal(resumer.model.weight, saver.model.weight)  # model_0000's weights
    assert "model_0002.pth cannot be read by torch.load: it is torn" in caplog.text
    assert "model_0001.pth is empty (0 bytes)" in caplog.text
    assert "Resuming from" in caplog.text and "model_0000.pth" in caplog.text

    (tmp_path / "model_0000.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointReadError, match="no intact checkpoint in .*model_0002.pth, "
                                                  "model_0001.pth, model_0000.pth"):
        _checkpointer(tmp_path).resume_or_load("", resume=True)


def test_full_disk_raises_naming_the_file_and_leaves_no_torn_file(tmp_path, monkeypatch):
    saver = _checkpointer(tmp_path)
    saver.save("model_best", epoch=0, metric=44.48)
    before = (tmp_path / "model_best.pth").read_bytes()

    def full_disk(data, handle):
        handle.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError, match=r"could not write .*model_best.pth \(No space"):
        saver.save("model_best", epoch=1, metric=50.0)
    assert (tmp_path / "model_best.pth").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_best.pth"]  # no temp file
    assert saver.best_metric == pytest.approx(44.48)  # the failed save did not count


def test_resume_never_replaces_a_better_best_model(tmp_path):
    first = _checkpointer(tmp_path)
    first.save("model_best", epoch=2, metric=44.48)
    first.save("model_0004", epoch=4, metric=43.0)
    resumed = _checkpointer(tmp_path, seed=1)
    resumed.resume_or_load("", resume=True)
    assert resumed.best_metric == pytest.approx(44.48)
    resumed.save("model_best", epoch=5, metric=41.98)  # fast-reid's hook asks: its best is -1
    assert torch.load(tmp_path / "model_best.pth")["epoch"] == 2
    resumed.save("model_best", epoch=6, metric=45.0)
    assert torch.load(tmp_path / "model_best.pth")["epoch"] == 6


def test_resumed_training_keeps_the_best_model_and_logs_each_iteration_once(dataset_root,
                                                                             tmp_path):
    from adaptive_l2.trainer import Trainer

    cfg = tiny_cfg(dataset_root, tmp_path, "SOLVER.MAX_EPOCH", "3", "TEST.EVAL_PERIOD", "1")
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    best = torch.load(tmp_path / "model_best.pth")
    best["metric"] = 99.0  # a best no later epoch can beat
    torch.save(best, tmp_path / "model_best.pth")
    # killed during the last epoch: model_final.pth never written
    os.remove(tmp_path / "model_final.pth")
    (tmp_path / "last_checkpoint").write_text("model_0001.pth")
    with open(tmp_path / "metrics.json") as handle:
        lived = [json.loads(line)["iteration"] for line in handle]
    assert lived == [0, 1, 2, 3, 4, 5]

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_epoch == 2
    trainer.train()
    kept = torch.load(tmp_path / "model_best.pth", mmap=True)
    assert (kept["epoch"], kept["metric"]) == (best["epoch"], 99.0)
    with open(tmp_path / "metrics.json") as handle:
        iterations = [json.loads(line)["iteration"] for line in handle]
    assert iterations == [0, 1, 2, 3, 4, 5]  # 4 and 5 lived twice, logged once


def _lock_holder(folder):
    """A live process that holds `folder`'s run lock until killed."""
    code = ("import sys, time; from adaptive_l2.run_lock import claim_output_dir; "
            "claim_output_dir(sys.argv[1], command=['holder']); print('held', flush=True); "
            "time.sleep(120)")
    env = dict(os.environ, PYTHONPATH=REPO)
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE,
                              text=True, env=env)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_second_run_into_a_running_folder_is_refused(dataset_root, tmp_path):
    out = tmp_path / "run"
    holder = _lock_holder(out)
    try:
        second = run_train_net(["--config-file", SYNTHETIC_BASE, *tiny_opts(dataset_root, out)],
                               timeout=60, check=False)
    finally:
        holder.kill()
        holder.wait()
    assert second.returncode != 0
    assert f"FolderBusyError: OUTPUT_DIR {out} is in use by another run: pid {holder.pid} on " \
           f"host {socket.gethostname()}" in second.stderr
    assert "command: holder" in second.stderr
    assert sorted(os.listdir(out)) == [RUN_LOCK_FILE]  # the refused run wrote nothing


def test_stale_lock_is_taken_over_and_a_live_one_refused(tmp_path, caplog):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / RUN_LOCK_FILE).write_text(json.dumps(
        {"pid": gone.pid, "host": socket.gethostname(), "start_time": 0, "command": "killed"}))
    with caplog.at_level(logging.WARNING, logger="adaptive_l2.run_lock"):
        lock = claim_output_dir(str(tmp_path), command=["me"])
    assert "took over the stale lock" in caplog.text and f"pid {gone.pid}" in caplog.text
    assert json.loads((tmp_path / RUN_LOCK_FILE).read_text())["pid"] == os.getpid()
    with pytest.raises(FolderBusyError, match=f"pid {os.getpid()}"):
        claim_output_dir(str(tmp_path))  # held by this live process
    lock.release()
    assert not (tmp_path / RUN_LOCK_FILE).exists()


def test_finished_folder_needs_resume_or_overwrite(tmp_path):
    (tmp_path / "final_results.json").write_text("{}")
    with pytest.raises(FinishedRunError, match=f"OUTPUT_DIR {tmp_path} holds a finished run.*"
                                               "--resume.*--overwrite"):
        claim_output_dir(str(tmp_path))
    assert not (tmp_path / RUN_LOCK_FILE).exists()  # the refusal released the lock
    claim_output_dir(str(tmp_path), resume=True).release()
    assert (tmp_path / "final_results.json").exists()
    claim_output_dir(str(tmp_path), overwrite=True).release()
    assert not (tmp_path / "final_results.json").exists()


def test_synthetic_dataset_of_other_sizes_leaves_the_first_untouched(tmp_path):
    small = dict(num_train_ids=3, num_test_ids=3, num_distractors=2, num_cameras=2,
                 images_per_id=3, height=32, width=16)
    assert dataset_folder_name() == "SyntheticReID"  # the default keeps today's name
    first = tmp_path / dataset_folder_name(**small)
    generate_synthetic_market(str(first), **small)
    files = {p: os.stat(os.path.join(first, p)).st_mtime_ns for p in os.listdir(first)}
    other = {**small, "num_train_ids": 4}
    second = tmp_path / dataset_folder_name(**other)
    assert second != first
    generate_synthetic_market(str(second), **other)
    assert {p: os.stat(os.path.join(first, p)).st_mtime_ns for p in os.listdir(first)} == files
    assert json.loads((first / "generation.json").read_text())["params"]["num_train_ids"] == 3


def test_divergence_stops_the_run_without_results(dataset_root, tmp_path):
    out = tmp_path / "diverged"
    result = run_train_net(["--config-file", SYNTHETIC_BASE, *tiny_opts(
        dataset_root, out, "SOLVER.BASE_LR", "1e6", "SOLVER.MAX_EPOCH", "4",
        "TEST.EVAL_PERIOD", "4")], timeout=120, check=False)
    assert result.returncode != 0
    # the loss went from 4.7 to 1.7e11 at iteration 1 (finite: fast-reid's own check passes it)
    assert "FloatingPointError: training diverged at iteration 1: total_loss" in result.stderr, \
        result.stderr[-3000:]
    assert not (out / "final_results.json").exists()
