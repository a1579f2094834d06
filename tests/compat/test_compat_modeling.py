"""compat.modeling: fast-reid's models leave the caller's batch untouched and train without a
host sync; triplet distances in fp32 under fp16 autocast."""
from __future__ import annotations

import math
import sys
from typing import List

import pytest
import torch

import adaptive_l2  # noqa: F401  (compat patches before fast-reid imports)
from fastreid.utils.events import EventStorage

from step_helpers import BATCH, build_step, step_config, synthetic_batch


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


def test_models_leave_the_callers_images_untouched():
    from fastreid.config import get_cfg
    from fastreid.modeling.meta_arch import build_model

    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.DEPTH = "18x"
    cfg.MODEL.BACKBONE.FEAT_DIM = 512
    cfg.MODEL.HEADS.NUM_CLASSES = 2
    model = build_model(cfg).eval()
    images = torch.rand(2, 3, 64, 32) * 255
    original = images.clone()
    with torch.no_grad():
        model({"images": images})
    assert torch.equal(images, original)
