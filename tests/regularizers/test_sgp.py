"""SGP (reconstructed from the abstract): perturb_gradient, SGP-F on a fast-reid model, SGP-P."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import adaptive_l2  # noqa: F401  (compat patches before fast-reid imports)
from adaptive_l2.adversarial import embed
from adaptive_l2.regularizers.sgp import (FeatureGradientPerturbation,
                                          ParameterGradientPerturbation, perturb_gradient)
from fastreid.utils.events import EventStorage

from small_models import small_batch, small_model, train_step_grads


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
        # the same batch as rank 0 or rank 1 of 2: another share of the global draw
        FeatureGradientPerturbation(model, alpha=0.3, seed=7, rank=rank, world_size=2)
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


def test_sgp_p_scales_each_tensor_by_its_own_norm():
    generator = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.zeros(shape)) for shape in ((64, 32), (500,), (8, 4, 3, 3))]
    for param, size in zip(params, (1e-4, 1.0, 1e3)):
        param.grad = torch.randn(param.shape, generator=generator) * size
    before = [p.grad.clone() for p in params]
    ParameterGradientPerturbation(alpha=0.3, seed=0).apply(params)
    for param, old in zip(params, before):
        relative = ((param.grad - old).norm() / old.norm()).item()
        assert relative == pytest.approx(0.3, rel=0.15)


def test_sgp_p_runs_a_constant_number_of_ops_whatever_the_number_of_tensors():
    class OpCounter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += not func.is_view  # views of the noise buffer launch nothing
            return func(*args, **(kwargs or {}))

    counts = []
    for num_tensors in (10, 400):
        params = [nn.Parameter(torch.zeros(5, 3)) for _ in range(num_tensors)]
        for param in params:
            param.grad = torch.ones(5, 3)
        sgp = ParameterGradientPerturbation(alpha=0.1, seed=0)
        sgp.apply(params)  # layout cached at the first call
        with OpCounter() as counter:
            sgp.apply(params)
        counts.append(counter.count)
    # views of the one noise buffer are counted too (one per tensor), kernels are not per tensor
    assert counts[1] - counts[0] <= 2 * (400 - 10)
    assert counts[0] < 80
