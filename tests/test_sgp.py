"""Tests of SGP (reconstructed from the abstract), the metric attack, AT and robustness."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import adaptive_l2  # noqa: F401  (compat patches before fast-reid imports)
from adaptive_l2.adversarial import AdversarialTraining, embed, metric_attack
from adaptive_l2.evaluation.robustness import (AttackSpec, evaluate_robustness,
                                               format_robustness_comparison,
                                               format_robustness_table)
from adaptive_l2.regularizers.sgp import (FeatureGradientPerturbation,
                                          ParameterGradientPerturbation, perturb_gradient)
from fastreid.config import get_cfg
from fastreid.evaluation.rank import evaluate_rank
from fastreid.modeling.meta_arch import build_model
from fastreid.utils.compute_dist import build_dist
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


# ---------------------------------------------------------------- perturb_gradient


def test_alpha_zero_returns_the_gradient_itself():
    grad = torch.randn(3, 5)
    assert perturb_gradient(grad, 0.0, 1.0, "gaussian", torch.Generator()) is grad


@pytest.mark.parametrize("noise", ["gaussian", "uniform", "rademacher"])
@pytest.mark.parametrize("alpha", [0.1, 0.3])
def test_relative_perturbation_is_alpha_and_noise_has_mean_zero(alpha: float, noise: str):
    grad = torch.randn(64, 4096, generator=torch.Generator().manual_seed(3)) * 5.0
    perturbed = perturb_gradient(grad, alpha, 1.0, noise, torch.Generator().manual_seed(4))
    delta = perturbed - grad
    relative = delta.norm(dim=1) / grad.norm(dim=1)
    assert relative.mean().item() == pytest.approx(alpha, rel=0.1)
    # per sample too: ||xi|| / sqrt(d) concentrates at 1 for large d
    assert relative.min().item() > 0.9 * alpha and relative.max().item() < 1.1 * alpha
    assert abs(delta.mean().item()) < 0.01 * delta.std().item()


def test_prob_perturbs_that_fraction_of_samples():
    grad = torch.randn(2000, 16)
    perturbed = perturb_gradient(grad, 0.2, 0.3, "gaussian", torch.Generator().manual_seed(0))
    changed = (perturbed != grad).any(dim=1).float().mean().item()
    assert changed == pytest.approx(0.3, abs=0.05)
    assert torch.equal(perturb_gradient(grad, 0.2, 0.0, "gaussian", torch.Generator()), grad)


def test_perturb_gradient_keeps_dtype_and_rejects_bad_arguments():
    grad = torch.randn(4, 8, dtype=torch.float64)
    assert perturb_gradient(grad, 0.1, 1.0, "uniform", torch.Generator()).dtype == torch.float64
    with pytest.raises(ValueError, match="noise"):
        perturb_gradient(grad, 0.1, 1.0, "laplace", torch.Generator())
    with pytest.raises(ValueError, match="alpha"):
        perturb_gradient(grad, -0.1, 1.0, "gaussian", torch.Generator())
    with pytest.raises(ValueError, match="prob"):
        perturb_gradient(grad, 0.1, 1.5, "gaussian", torch.Generator())


# ---------------------------------------------------------------- SGP-F on a fast-reid model


def test_alpha_zero_gives_the_baseline_gradients_bit_for_bit():
    model, batch = small_model(), small_batch()
    baseline = train_step_grads(model, batch)
    sgp = FeatureGradientPerturbation(model, alpha=0.0, seed=5)
    with_hook = train_step_grads(model, batch)
    sgp.remove()
    assert baseline.keys() == with_hook.keys()
    for name in baseline:
        assert torch.equal(baseline[name], with_hook[name]), name


def test_sgp_f_changes_only_the_layers_below_the_site():
    model, batch = small_model(), small_batch()
    baseline = train_step_grads(model, batch)
    sgp = FeatureGradientPerturbation(model, sites=("backbone",), alpha=0.3, seed=5)
    perturbed = train_step_grads(model, batch)
    for name in baseline:
        same = torch.equal(baseline[name], perturbed[name])
        assert same == (not name.startswith("backbone.")), name
    assert sgp.last_relative_perturbation == pytest.approx(0.3, rel=0.1)
    assert set(sgp.relative_perturbations) == {"backbone"}
    sgp.remove()
    assert all(torch.equal(baseline[n], g) for n, g in train_step_grads(model, batch).items())


def test_sgp_f_is_off_when_disabled_or_the_site_is_frozen():
    model, batch = small_model(), small_batch()
    baseline = train_step_grads(model, batch)
    sgp = FeatureGradientPerturbation(model, alpha=0.3, seed=5, enabled=False)
    assert all(torch.equal(baseline[n], g) for n, g in train_step_grads(model, batch).items())
    sgp.set_enabled(True)
    model.train()
    model.backbone.eval()  # what fast-reid's LayerFreeze does to frozen layers
    model.zero_grad(set_to_none=True)
    with EventStorage(0):
        losses = model({key: value.clone() for key, value in batch.items()})
    sum(losses.values()).backward()
    assert sgp.last_relative_perturbation is None


def test_sgp_f_rejects_unknown_sites_naming_the_modules():
    with pytest.raises(ValueError, match=r"'neck'.*backbone.*heads"):
        FeatureGradientPerturbation(small_model(), sites=("neck",))


def test_sgp_f_leaves_evaluation_features_and_input_gradients_untouched():
    model, batch = small_model(), small_batch()
    model.eval()
    with torch.no_grad():
        clean = embed(model, batch["images"])
    images = batch["images"].clone().requires_grad_(True)
    (clean_input_grad,) = torch.autograd.grad(embed(model, images).sum(), images)

    sgp = FeatureGradientPerturbation(model, alpha=0.5, seed=5)
    with torch.no_grad():
        assert torch.equal(embed(model, batch["images"]), clean)
    (input_grad,) = torch.autograd.grad(embed(model, images).sum(), images)
    assert torch.equal(input_grad, clean_input_grad)
    assert sgp.last_relative_perturbation is None


def test_sgp_f_does_not_consume_the_global_rng():
    model, batch = small_model(), small_batch()
    FeatureGradientPerturbation(model, alpha=0.3, prob=0.5, noise="uniform", seed=5)
    state = torch.get_rng_state()
    train_step_grads(model, batch)
    assert torch.equal(torch.get_rng_state(), state)


def test_sgp_f_noise_is_repeatable_from_its_seed_and_differs_by_rank():
    batch = small_batch()
    grads = []
    for rank in (0, 0, 1):
        model = small_model()
        FeatureGradientPerturbation(model, alpha=0.3, seed=7, rank=rank)
        grads.append(train_step_grads(model, batch)["backbone.conv1.weight"])
    assert torch.equal(grads[0], grads[1])
    assert not torch.equal(grads[0], grads[2])


def test_sgp_f_handles_tuple_outputs():
    class Pair(nn.Module):
        def forward(self, x):
            return x * 2, {"other": x + 1}

    model = nn.Sequential()
    model.add_module("pair", Pair())
    x = torch.randn(4, 10, requires_grad=True)
    sgp = FeatureGradientPerturbation(model, sites=("pair",), alpha=0.2, seed=0)
    a, b = model(x)
    (a.sum() + b["other"].sum()).backward()
    assert set(sgp.relative_perturbations) == {"pair[0]", "pair[1]"}
    assert not torch.equal(x.grad, torch.full_like(x, 3.0))


# ---------------------------------------------------------------- SGP-P


def test_sgp_p_scales_with_alpha_and_skips_missing_grads():
    params = [nn.Parameter(torch.zeros(50, 100)), nn.Parameter(torch.zeros(3))]
    params[0].grad = torch.randn(50, 100)
    before = params[0].grad.clone()
    sgp = ParameterGradientPerturbation(alpha=0.2, seed=0)
    sgp.apply(params)
    relative = (params[0].grad - before).norm() / before.norm()
    assert relative.item() == pytest.approx(0.2, rel=0.1)
    assert params[1].grad is None
    assert sgp.last_relative_perturbation == pytest.approx(0.2, rel=0.1)
    with pytest.raises(TypeError, match="set"):
        sgp.apply(set(params))


def _sgp_p_rank(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        torch.manual_seed(100 + rank)  # rank-dependent global RNG must not matter
        params = [nn.Parameter(torch.zeros(shape)) for shape in ((8, 16), (16,), (4, 4, 3))]
        for index, param in enumerate(params):
            param.grad = torch.full(param.shape, float(rank + 1)) * (index + 1)
            dist.all_reduce(param.grad)
            param.grad /= world_size
        ParameterGradientPerturbation(alpha=0.3, noise="gaussian", seed=11).apply(params)
        torch.save([p.grad for p in params], os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sgp_p_adds_identical_noise_on_every_rank(tmp_path: Path):
    mp.spawn(_sgp_p_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    grads = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for g0, g1, index in zip(grads[0], grads[1], range(3)):
        assert torch.equal(g0, g1)
        assert not torch.equal(g0, torch.full_like(g0, 1.5 * (index + 1)))  # noise was added


# ---------------------------------------------------------------- metric attack and AT


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


# ---------------------------------------------------------------- robustness evaluation


def _write_test_set(root: Path, num_ids: int = 4, per_id: int = 3) -> List[tuple]:
    from PIL import Image

    rng = np.random.default_rng(0)
    items = []
    for pid in range(num_ids):
        base = rng.integers(0, 256, size=(HEIGHT // 8, WIDTH // 8, 3)).repeat(8, 0).repeat(8, 1)
        for index in range(per_id):
            noisy = np.clip(base + rng.normal(0, 6, size=base.shape), 0, 255).astype(np.uint8)
            path = root / f"{pid:04d}_c{index}_{index}.jpg"
            Image.fromarray(noisy).save(path, quality=95)
            items.append((str(path), pid, index))
    # one image per id as query (camera 0), the rest gallery
    queries = [item for item in items if item[2] == 0]
    gallery = [item for item in items if item[2] != 0]
    return queries + gallery


@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true")
@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")  # fast-reid's ToTensor
def test_evaluate_robustness_matches_fastreid_and_attacks_do_not_help(tmp_path: Path):
    from fastreid.data.build import build_reid_test_loader
    from fastreid.data.common import CommDataset
    from fastreid.data.transforms import build_transforms

    items = _write_test_set(tmp_path)
    num_query = 4
    dataset = CommDataset(items, build_transforms(small_cfg(), is_train=False), relabel=False)
    loader, _ = build_reid_test_loader(
        dataset, test_batch_size=3, num_query=num_query, num_workers=0
    )
    model = small_model(seed=2)
    attacks = (AttackSpec.clean(), AttackSpec.fgsm(8), AttackSpec.pgd(8))
    results = evaluate_robustness(model, loader, num_query, attacks=attacks, seed=0)
    assert list(results) == ["clean", "FGSM eps=8", "PGD-10 eps=8"]

    model.eval()
    batches = list(loader)
    with torch.no_grad():
        features = torch.cat([embed(model, b["images"]) for b in batches])
    pids = torch.cat([b["targets"] for b in batches]).numpy()
    camids = torch.cat([b["camids"] for b in batches]).numpy()
    distances = build_dist(features[:num_query], features[num_query:], "cosine")
    cmc, all_ap, _ = evaluate_rank(
        distances, pids[:num_query], pids[num_query:], camids[:num_query], camids[num_query:]
    )
    assert results["clean"].rank1 == pytest.approx(cmc[0] * 100)
    assert results["clean"].mAP == pytest.approx(np.mean(all_ap) * 100)
    assert results["PGD-10 eps=8"].rank1 <= results["clean"].rank1
    assert results["PGD-10 eps=8"].mAP <= results["clean"].mAP

    again = evaluate_robustness(model, batches, num_query, attacks=attacks[1:2], seed=0)
    assert again["FGSM eps=8"] == results["FGSM eps=8"]  # seeded per attack, list-independent

    table = format_robustness_table(results)
    assert table.splitlines()[0] == "| attack | eps (0-255) | Rank-1 (%) | mAP (%) |"
    assert "| PGD-10 | 8 |" in table
    both = format_robustness_comparison({"baseline": results, "sgp": again})
    assert "baseline Rank-1 (%)" in both and "| clean | 0 |" in both
