"""Adversarial training, the comparator of SGP: the clean + adversarial batch and its losses."""
from __future__ import annotations

from typing import List

import pytest
import torch

import adaptive_l2  # noqa: F401  (compat patches before fast-reid imports)
from adaptive_l2.adversarial import AdversarialTraining
from fastreid.utils.events import EventStorage

from small_models import cosine_distance, small_batch, small_model


def test_adversarial_training_batch_increases_the_targeted_distance():
    model, batch = small_model(), small_batch()
    training = AdversarialTraining(eps=4, steps=1)
    adversarial = training.attack(model, batch["images"], torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    signs = torch.randint(0, 2, batch["images"].shape, generator=generator) * 2 - 1
    noisy = (batch["images"] + 4.0 * signs).clamp(0, 255)
    attacked = cosine_distance(model, adversarial, batch["images"])
    random = cosine_distance(model, noisy, batch["images"])
    assert attacked.mean().item() > random.mean().item()


def test_adversarial_training_losses_train_on_both_halves():
    model, batch = small_model(), small_batch()
    model.train()
    original = batch["images"].clone()
    seen: List[int] = []
    model.backbone.register_forward_hook(lambda module, args, output: seen.append(len(output)))
    with EventStorage(0):
        losses = AdversarialTraining(eps=4).losses(model, batch, torch.Generator().manual_seed(0))
        assert list(losses) == ["loss_cls"] and torch.isfinite(losses["loss_cls"])
        assert all(p.grad is None for p in model.parameters())  # the attack left no grads
        assert seen[-1] == 8 and model.training
        assert torch.equal(batch["images"], original)
        weighted = AdversarialTraining(eps=4, adv_weight=0.5).losses(model, batch)
    assert sorted(weighted) == ["loss_cls", "loss_cls_adv"]
    with pytest.raises(ValueError, match="adv_weight"):
        AdversarialTraining(adv_weight=0.0)
