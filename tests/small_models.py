"""A small fast-reid Baseline (R18, CPU) and a batch for it, shared by the SGP, attack and
robustness tests."""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

import adaptive_l2  # noqa: F401  (compat patches before fast-reid imports)
from adaptive_l2.adversarial import embed
from fastreid.config import get_cfg
from fastreid.modeling.meta_arch import build_model
from fastreid.utils.events import EventStorage

HEIGHT, WIDTH = 64, 32


def small_cfg():
    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.DEPTH = "18x"
    cfg.MODEL.BACKBONE.FEAT_DIM = 512
    cfg.MODEL.BACKBONE.PRETRAIN = False
    cfg.MODEL.HEADS.NUM_CLASSES = 4
    cfg.MODEL.LOSSES.NAME = ("CrossEntropyLoss",)
    cfg.INPUT.SIZE_TEST = [HEIGHT, WIDTH]
    return cfg


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(small_cfg())


def small_batch(size: int = 4, seed: int = 1) -> Dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(size, 3, HEIGHT, WIDTH, generator=generator) * 255
    targets = torch.arange(size) % 4
    return {"images": images, "targets": targets, "camids": torch.zeros(size, dtype=torch.long)}


def train_step_grads(model: nn.Module, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    with EventStorage(0):
        losses = model({key: value.clone() for key, value in batch.items()})
    sum(losses.values()).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def cosine_distance(
    model: nn.Module, images: torch.Tensor, reference: torch.Tensor
) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        attacked = F.normalize(embed(model, images), dim=1)
        return 1 - (attacked * F.normalize(embed(model, reference), dim=1)).sum(1)
