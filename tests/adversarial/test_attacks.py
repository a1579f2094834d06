"""Metric attacks (FGSM / PGD) on re-ID embeddings."""
from __future__ import annotations

from typing import List

import pytest
import torch

import adaptive_l2  # noqa: F401  (compat patches before fast-reid imports)
from adaptive_l2.adversarial import AdversarialTraining, metric_attack
from fastreid.utils.events import EventStorage

from small_models import cosine_distance, small_batch, small_model, train_step_grads


def test_attack_respects_budget_range_modes_and_param_grads():
    model, batch = small_model(), small_batch()
    images = batch["images"]
    images[:, :, :4] = 0.0
    images[:, :, -4:] = 255.0
    train_step_grads(model, batch)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.train()
    model.backbone.eval()  # a frozen child must come back frozen
    generator = torch.Generator().manual_seed(0)
    adversarial = metric_attack(model, images, eps=8, steps=3, generator=generator)
    assert not adversarial.requires_grad
    assert (adversarial - images).abs().max().item() <= 8 + 1e-3
    assert adversarial.min().item() >= 0 and adversarial.max().item() <= 255
    assert not torch.equal(adversarial, images)
    assert model.training and model.heads.training and not model.backbone.training
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="random_start"):
        metric_attack(model, images, eps=8, random_start=False)


def test_attack_damage_grows_with_eps_and_pgd_beats_fgsm():
    model, images = small_model(), small_batch(size=4)["images"]
    damage = {}
    for kind, steps in (("fgsm", 1), ("pgd", 10)):
        for eps in (2, 8):
            generator = torch.Generator().manual_seed(0)
            adversarial = metric_attack(model, images, eps, steps, generator=generator)
            damage[kind, eps] = cosine_distance(model, adversarial, images).mean().item()
    assert damage["pgd", 8] > damage["pgd", 2]
    assert damage["fgsm", 8] > damage["fgsm", 2]
    assert damage["pgd", 2] >= damage["fgsm", 2]
    assert damage["pgd", 8] >= damage["fgsm", 8]


def test_attack_under_fp16_autocast_equals_the_fp32_attack_and_training_stays_fp16():
    # torch.autocast("cpu", float16) stands in for the trainer's CUDA AMP. Without fp32 inside the
    # attack the input gradient (about 1e-9 per pixel) underflows or is rounding noise in fp16 and
    # the images move in wrong directions (max difference 2 * eps from the fp32 attack).
    model, batch = small_model(), small_batch()
    training = AdversarialTraining(eps=4, steps=1)
    reference = training.attack(model, batch["images"], torch.Generator().manual_seed(0))
    dtypes: List[torch.dtype] = []
    model.backbone.register_forward_hook(lambda module, args, output: dtypes.append(output.dtype))
    model.train()
    with torch.autocast("cpu", dtype=torch.float16), EventStorage(0):
        attacked = training.attack(model, batch["images"], torch.Generator().manual_seed(0))
        del dtypes[:]
        losses = training.losses(model, batch, torch.Generator().manual_seed(0))
    assert torch.equal(attacked, reference)
    assert (attacked - batch["images"]).abs().max().item() > 3.9  # it moved: a real attack
    # the attack's clean and attacked forwards in fp32, the 2B-image training forward in fp16
    assert dtypes == [torch.float32] * 2 + [torch.float16]
    assert torch.isfinite(losses["loss_cls"])
