"""Every shipped YAML loads, builds its model (pretraining off) and runs one training step."""
import glob
import os

import pytest
import torch
from conftest import REPO
from fastreid.utils.events import EventStorage

from adaptive_l2.config import load_config
from adaptive_l2.optim import build_optimizer
from adaptive_l2.trainer import Trainer

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yml"), recursive=True))
PAPER_ROWS = sorted(glob.glob(os.path.join(REPO, "configs", "Paper", "*", "*.yml")))


def test_a_config_for_every_row_of_the_paper_table():
    rows = {"conventional_l2_R50", "adaptive_l2_R50", "adaptive_l2_R101", "adaptive_l2_R152",
            "adaptive_l2_R152_rerank"}
    for dataset in ("Market1501", "DukeMTMC", "MSMT17"):
        present = {os.path.basename(p)[:-4] for p in PAPER_ROWS if f"/{dataset}/" in p}
        assert rows <= present, dataset


_stepped = set()


def _model_signature(cfg):
    reg = cfg.MODEL.REG
    return (cfg.MODEL.META_ARCHITECTURE, cfg.MODEL.BACKBONE.DEPTH, reg.NAME, reg.SGP.ENABLED,
            reg.SGP.MODE, reg.AT.ENABLED)


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.relpath(p, REPO) for p in CONFIGS])
def test_config_builds_and_trains_one_step(path):
    """Every config builds its model; one step runs per distinct model (the three datasets'
    configs of a row build the same network, so stepping each would only triple the time)."""
    cfg = load_config(path, ["MODEL.DEVICE", "cpu", "MODEL.BACKBONE.PRETRAIN", "False",
                             "MODEL.HEADS.NUM_CLASSES", "4", "SOLVER.AMP.ENABLED", "False"])
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    optimizer, _ = build_optimizer(cfg, model)
    assert sum(p.numel() for p in model.parameters()) > 1e6
    if _model_signature(cfg) in _stepped:
        return
    _stepped.add(_model_signature(cfg))
    height = 96 if cfg.MODEL.META_ARCHITECTURE != "TwoBranchReID" else 64
    batch = {"images": torch.rand(8, 3, height, 32) * 255, "targets": torch.arange(8) % 2}
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    with EventStorage(0):
        losses = model(batch)
    total = sum(losses.values())
    assert torch.isfinite(total)
    optimizer.zero_grad()
    total.backward()
    optimizer.step()
    after = [p for p in model.parameters() if p.requires_grad]
    assert sum(not torch.equal(a, b) for a, b in zip(before, after)) > len(after) // 2
