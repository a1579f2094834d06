"""End-to-end behaviour of the trainer on the embedded dataset: it learns, repeats, resumes,
evaluates from a checkpoint, and runs as two gloo processes."""
import json
import os

import torch
from conftest import (SYNTHETIC_BASE, read_losses, read_results, run_train_net, tiny_cfg,
                      tiny_opts)
from fastreid.utils.events import EventStorage

from adaptive_l2.run_files import RANK_FINGERPRINTS
from adaptive_l2.trainer import Trainer


def _batch(n=16, classes=4, size=(64, 32)):
    gen = torch.Generator().manual_seed(0)
    return {"images": torch.rand(n, 3, *size, generator=gen) * 255,
            "targets": torch.arange(n) % classes}


def test_a_few_steps_change_every_trainable_tensor(dataset_root, tmp_path):
    cfg = tiny_cfg(dataset_root, tmp_path, "MODEL.HEADS.NUM_CLASSES", "4")
    model = Trainer.build_model(cfg)
    optimizer, _ = Trainer.build_optimizer(cfg, model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with EventStorage(0):
        for _ in range(3):
            losses = sum(model(_batch()).values())
            optimizer.zero_grad()
            losses.backward()
            optimizer.step()
    unchanged = [n for n, p in model.named_parameters() if n in before and torch.equal(p, before[n])]
    assert len(before) > 50
    assert unchanged == []


def test_fastreids_own_optimizer_does_not_train_on_torch2(dataset_root, tmp_path):
    """The host bug the project's optimizer avoids: contiguous buffers never update."""
    from fastreid.solver import build_optimizer as fastreid_build_optimizer

    cfg = tiny_cfg(dataset_root, tmp_path, "MODEL.HEADS.NUM_CLASSES", "4")
    model = Trainer.build_model(cfg)
    optimizer, _ = fastreid_build_optimizer(cfg, model)
    before = [p.detach().clone() for p in model.parameters()]
    with EventStorage(0):
        for _ in range(2):
            losses = sum(model(_batch()).values())
            optimizer.zero_grad()
            losses.backward()
            optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_training_learns_and_same_seed_repeats_exactly(dataset_root, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    opts = ["SOLVER.MAX_EPOCH", "4", "TEST.EVAL_PERIOD", "4"]
    run_train_net(["--config-file", SYNTHETIC_BASE, *tiny_opts(dataset_root, first, *opts)])
    run_train_net(["--config-file", SYNTHETIC_BASE, *tiny_opts(dataset_root, second, *opts)])
    losses_a, losses_b = read_losses(first), read_losses(second)
    assert len(losses_a) == 8
    assert losses_a == losses_b
    assert losses_a[-1][1] < losses_a[0][1]  # it learns
    results_a, results_b = read_results(first), read_results(second)
    assert results_a == results_b
    assert 0.0 < results_a["mAP"] <= 100.0


def test_eval_only_reproduces_metrics_and_resume_continues(dataset_root, tmp_path):
    out = tmp_path / "run"
    sgp = ["MODEL.REG.SGP.ENABLED", "True"]  # its random stream is checkpointed and resumed too
    run_train_net(["--config-file", SYNTHETIC_BASE, *tiny_opts(dataset_root, out, *sgp)])
    trained = read_results(out)
    evaluated_dir = tmp_path / "eval"
    run_train_net(["--config-file", SYNTHETIC_BASE, "--eval-only",
                   *tiny_opts(dataset_root, evaluated_dir, "MODEL.WEIGHTS",
                              str(out / "model_final.pth"))])
    evaluated = read_results(evaluated_dir)
    for key in ("Rank-1", "mAP", "mINP"):
        assert abs(evaluated[key] - trained[key]) < 1e-6, key
    # resume: 2 more epochs from the last checkpoint, starting at iteration 4
    resumed = run_train_net(["--config-file", SYNTHETIC_BASE, "--resume",
                             *tiny_opts(dataset_root, out, "SOLVER.MAX_EPOCH", "4",
                                        "TEST.EVAL_PERIOD", "4", *sgp)])
    assert "Starting training from epoch 2" in resumed.stderr + resumed.stdout
    iterations = [i for i, _ in read_losses(out)]
    assert max(iterations) == 7
    # killed after its last checkpoint, before its results were written: --resume evaluates
    os.remove(out / "final_results.json")
    run_train_net(["--config-file", SYNTHETIC_BASE, "--resume",
                   *tiny_opts(dataset_root, out, "SOLVER.MAX_EPOCH", "4", "TEST.EVAL_PERIOD", "4")])
    assert read_results(out)["mAP"] > 0


def test_two_gloo_processes_end_with_identical_parameters(dataset_root, tmp_path):
    out = tmp_path / "ddp"
    run_train_net(["--config-file", os.path.join(os.path.dirname(SYNTHETIC_BASE), "adaptive_l2.yml"),
                   "--num-gpus", "2", *tiny_opts(dataset_root, out)])
    with open(out / RANK_FINGERPRINTS) as handle:
        prints = json.load(handle)
    assert len(prints) == 2
    assert prints[0] == prints[1]
    assert len(prints[0]["thetas"]) > 50
    assert any(t != 0.0 for t in prints[0]["thetas"])  # the thetas trained, identically
    assert read_results(out)["mAP"] > 0


def test_torchrun_two_cpu_processes_join_one_job(dataset_root, tmp_path):
    """env:// rendezvous as torchrun sets it up (the multi-node path is the same code)."""
    import subprocess
    import sys

    from conftest import REPO, TRAIN_NET

    from fastreid.engine.launch import _find_free_port

    out = tmp_path / "torchrun"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(_find_free_port()), TRAIN_NET,
         "--config-file", SYNTHETIC_BASE, *tiny_opts(dataset_root, out)],
        capture_output=True, text=True, timeout=180, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    with open(out / RANK_FINGERPRINTS) as handle:
        prints = json.load(handle)
    assert len(prints) == 2 and prints[0] == prints[1]


def test_amp_on_cpu_falls_back_to_fp32_with_a_warning(dataset_root, tmp_path, caplog):
    from adaptive_l2.trainer import resolve_amp

    cfg = tiny_cfg(dataset_root, tmp_path, "SOLVER.AMP.ENABLED", "True")
    with caplog.at_level("WARNING"):
        resolved = resolve_amp(cfg)
    assert resolved.SOLVER.AMP.ENABLED is False and cfg.SOLVER.AMP.ENABLED is True
    assert "AMP needs CUDA" in caplog.text


def test_resumed_run_drops_log_records_of_the_lost_epochs(tmp_path):
    from adaptive_l2.hooks import keep_records_until

    path = tmp_path / "eval_history.jsonl"
    path.write_text("".join(json.dumps({"iteration": i, "mAP": i}) + "\n" for i in (0, 16, 32, 48)))
    keep_records_until(str(path), 32)  # resumed from the checkpoint of iteration 32
    assert [json.loads(line)["iteration"] for line in path.read_text().splitlines()] == [0, 16, 32]
    keep_records_until(str(path), 0)  # a fresh run in the same folder
    assert path.read_text() == ""
