"""The paper's protocol: learning rate per epoch in both phases, phase-A freezing, P x K sampling,
and the table tool (full table from a tiny suite; a killed matrix resumes)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TINY_DATASET, TINY_TRAINING, tiny_cfg
from fastreid.utils.events import EventStorage

from adaptive_l2.config import load_config
from adaptive_l2.data.samplers import StrictIdentitySampler
from adaptive_l2.hooks import ResumableLayerFreeze
from adaptive_l2.solver import build_lr_scheduler
from adaptive_l2.trainer import Trainer

PAPER_R50 = os.path.join(REPO, "configs", "Paper", "Market1501", "adaptive_l2_R50.yml")


def reference_lr(epoch):
    """The original Keras schedule, written out: same table in phase A (0-19) and B (20-219)."""
    e = epoch if epoch < 20 else epoch - 20
    if e <= 9:
        return 2e-6 + (1.98e-4 / 9) * e
    if e <= 39:
        return 2e-4
    if e <= 69:
        return 2e-5
    return 2e-6


def test_learning_rate_equals_the_reference_at_every_epoch_of_both_phases():
    cfg = load_config(PAPER_R50, ["MODEL.DEVICE", "cpu"])
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([param], lr=cfg.SOLVER.BASE_LR)
    scheduler = build_lr_scheduler(cfg, optimizer, 200)["lr_sched"]
    assert cfg.SOLVER.MAX_EPOCH == 220 and cfg.SOLVER.FREEZE_ITERS == 20 * 200
    for epoch in range(cfg.SOLVER.MAX_EPOCH):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(reference_lr(epoch), rel=1e-9), epoch
        scheduler.step()  # fast-reid's LRScheduler hook steps after every epoch


def test_phase_a_freezes_backbone_bn_and_thetas_then_phase_b_trains_all(tmp_path):
    cfg = load_config(PAPER_R50, [
        "MODEL.DEVICE", "cpu", "MODEL.BACKBONE.PRETRAIN", "False", "MODEL.BACKBONE.DEPTH", "18x", "MODEL.BACKBONE.STRIDE_IN_1X1", "False",
        "MODEL.HEADS.NUM_CLASSES", "4", "SOLVER.AMP.ENABLED", "False", "SOLVER.FREEZE_ITERS", "2"])
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    optimizer, _ = Trainer.build_optimizer(cfg, model)
    frozen_names = ("backbone", "global_conv5", "regional_conv5")
    hook = ResumableLayerFreeze(model, optimizer, cfg.MODEL.FREEZE_LAYERS, cfg.SOLVER.FREEZE_ITERS)

    class FakeTrainer:
        iter = 0

    hook.trainer = FakeTrainer()
    model.train()
    penalty = model.l2_penalty
    frozen_theta = [i for i, e in enumerate(penalty.entries) if e.name.startswith(frozen_names)]
    batch = {"images": torch.rand(8, 3, 64, 32) * 255, "targets": torch.arange(8) % 2}

    def step():
        hook.before_step()
        with EventStorage(0):
            loss = sum(model(batch).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        hook.trainer.iter += 1

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(frozen_names)}
    for index in range(2):  # phase A
        if index == 1:  # an evaluation in between: fast-reid's inference_context ends in train()
            from fastreid.evaluation.evaluator import inference_context

            with inference_context(model):
                pass
            assert model.backbone.training
        step()
        for name in frozen_names:
            bns = [m for m in getattr(model, name).modules() if isinstance(m, torch.nn.BatchNorm2d)]
            assert bns and not any(m.training for m in bns)
        assert model.heads.training
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert torch.all(penalty.theta_vector().detach()[frozen_theta] == 0)
    assert torch.all(penalty.theta_vector().detach()[[i for i, e in enumerate(penalty.entries)
                                                      if e.name.startswith("heads.")
                                                      and e.kind == "kernel"]] < 0)
    step()  # phase B
    assert getattr(model, "backbone").training
    changed = [n for n, p in model.named_parameters() if n in frozen and not torch.equal(p, frozen[n])]
    assert len(changed) > len(frozen) // 2


def test_sampler_yields_p_by_k_batches_of_identities_with_enough_images():
    items = []
    for pid, count in enumerate([2, 3, 4, 5, 6, 8, 4, 1, 7, 4]):
        items += [(f"img_{pid}_{i}", pid, 0) for i in range(count)]
    sampler = StrictIdentitySampler(items, global_batch_size=12, num_instances=4, seed=0)
    stream = iter(sampler)
    eligible = {pid for pid, count in enumerate([2, 3, 4, 5, 6, 8, 4, 1, 7, 4]) if count >= 4}
    seen = set()
    for _ in range(50):
        batch = [next(stream) for _ in range(12)]
        pids = [items[i][1] for i in batch]
        assert len(set(batch)) == 12  # no image twice in a batch
        for k in range(3):
            chunk = pids[4 * k: 4 * (k + 1)]
            assert len(set(chunk)) == 1 and chunk[0] in eligible
        assert len(set(pids)) == 3
        seen |= set(pids)
    assert seen == eligible
    with pytest.raises(ValueError, match="NUM_INSTANCE"):
        StrictIdentitySampler(items, global_batch_size=10, num_instances=4, seed=0)


def _tool(args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "reproduce_table.py"), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


def test_table_tool_builds_the_full_table_and_resumes_a_killed_matrix(dataset_root, tmp_path):
    root = str(tmp_path / "suite")
    opts = [*TINY_DATASET, *TINY_TRAINING, "DATASETS.ROOT", dataset_root]
    # a killed matrix: the first row finished, the second died after its first checkpoint
    first = _tool(["--suite", "synthetic", "--output-root", root, "--rows", "baseline", *opts])
    assert first.returncode == 0, first.stderr[-3000:]
    killed_dir = os.path.join(root, "Synthetic", "conventional_l2")
    killed = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file",
         os.path.join(REPO, "configs", "Synthetic", "conventional_l2.yml"), *opts,
         "SOLVER.MAX_EPOCH", "1", "OUTPUT_DIR", killed_dir],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert killed.returncode == 0, killed.stderr[-3000:]
    os.remove(os.path.join(killed_dir, "final_results.json"))  # as if it died after epoch 1
    baseline_mtime = os.path.getmtime(os.path.join(root, "Synthetic", "baseline", "final_results.json"))

    dry = _tool(["--suite", "synthetic", "--output-root", root, "--dry-run", "--no-measure", *opts])
    assert "[done]" in dry.stdout and "[interrupted]" in dry.stdout and "[todo]" in dry.stdout
    resumed = _tool(["--suite", "synthetic", "--output-root", root, *opts])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Synthetic/baseline: finished before, kept" in resumed.stdout
    assert "Synthetic/conventional_l2: resuming" in resumed.stdout
    assert os.path.getmtime(os.path.join(root, "Synthetic", "baseline", "final_results.json")) == baseline_mtime
    with open(os.path.join(root, "results.csv")) as handle:
        lines = handle.read().strip().splitlines()
    assert len(lines) == 4  # header + baseline, conventional_l2, adaptive_l2
    assert all(",done," in line for line in lines[1:])
    table = open(os.path.join(root, "results.md")).read()
    assert "selected on test" in table and "adaptive_l2" in table
    assert os.path.isfile(os.path.join(root, "Synthetic", "adaptive_l2", "factor_histogram.png"))


def test_paper_dry_run_prints_one_command_per_row():
    result = _tool(["--suite", "paper", "--dry-run", "--no-measure"])
    assert result.returncode == 0, result.stderr[-3000:]
    commands = [line for line in result.stdout.splitlines() if "-m adaptive_l2.cli.train" in line]
    assert len(commands) == 15
    rerank = [c for c in commands if "R152_rerank" in c]
    assert len(rerank) == 3  # the dagger rows re-rank the R152 rows' final models, no training
    assert all("--eval-only" in c and "adaptive_l2_R152/model_final.pth" in c for c in rerank)


def test_paper_model_trains_then_evaluates_with_reranking(dataset_root, tmp_path):
    """The two-branch protocol end to end at toy size on the CPU, then the dagger row's
    evaluation (--eval-only, k-reciprocal re-ranking) of its checkpoint."""
    from conftest import read_results, run_train_net, tiny_opts

    toy = ["MODEL.DEVICE", "cpu", "MODEL.BACKBONE.DEPTH", "18x", "MODEL.BACKBONE.STRIDE_IN_1X1", "False", "MODEL.BACKBONE.FEAT_DIM", "512",
           "MODEL.BACKBONE.PRETRAIN", "False", "SOLVER.AMP.ENABLED", "False",
           "DATASETS.NAMES", '("SyntheticReID",)', "DATASETS.TESTS", '("SyntheticReID",)',
           "SOLVER.SCHED", "EpochTableLR",
           "SOLVER.WARMUP_ITERS", "0", "SOLVER.FREEZE_ITERS", "2", "SOLVER.EPOCH_LR.RESTART_EPOCH", "1",
           "SOLVER.EPOCH_LR.WARMUP_EPOCHS", "1", "TEST.RERANK.K1", "4", "TEST.RERANK.K2", "2"]
    out = tmp_path / "paper_toy"
    run_train_net(["--config-file", PAPER_R50, *tiny_opts(dataset_root, out, *toy)])
    trained = read_results(out)
    reranked_dir = tmp_path / "rerank"
    run_train_net(["--config-file", PAPER_R50, "--eval-only", *tiny_opts(
        dataset_root, reranked_dir, *toy, "TEST.RERANK.ENABLED", "True",
        "MODEL.WEIGHTS", str(out / "model_final.pth"))])
    reranked = read_results(reranked_dir)
    assert 0 < trained["mAP"] <= 100 and 0 < reranked["mAP"] <= 100
    assert reranked["mAP"] != trained["mAP"]  # re-ranking changed the ranking
