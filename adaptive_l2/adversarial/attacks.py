"""Metric attacks on re-ID embeddings: untargeted FGSM / PGD (:func:`metric_attack`).

They serve adversarial training (:mod:`adaptive_l2.adversarial.training`), the comparator of SGP
(reconstructed from the abstract), and the robustness evaluation
(:mod:`adaptive_l2.evaluation.robustness`).

Distance: the attack maximizes the cosine distance ``1 - cos(f(x_adv), f(x))`` between the
L2-normalized embeddings of the attacked image and of the clean image, the metric fast-reid ranks
with (``TEST.METRIC: cosine``). Images are on fast-reid's 0-255 pixel scale, so ``eps`` is in
pixel levels (eps 8 = 8/255).

Start point: the distance is minimal (0) at the clean image, so its gradient there is exactly zero
and a step from the clean image would not move. Every attack therefore starts from a random point:
PGD uniformly in the whole ball (Madry et al.), FGSM uniformly in a ball of radius eps/4 followed by
one step of size eps, projected back onto the eps ball ("FGSM with random start", as in Wong et al.
2020). ``random_start=False`` is refused for that reason.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaptive_l2.global_batch import draw_for_share
from adaptive_l2.modeling.model_state import model_device, restore_modes, save_modes, unwrap_model

__all__ = ["attack_with", "embed", "metric_attack"]


def embed(model: nn.Module, images: Tensor) -> Tensor:
    """The model's embedding of ``images`` as a (B, D) tensor, in whatever mode the model is in.

    The images are cloned because fast-reid's meta-architectures normalize them in place.
    """
    output = model({"images": images.clone()})
    if not isinstance(output, Tensor):
        raise TypeError(
            f"{type(model).__name__} returned {type(output).__name__}, not an embedding tensor: "
            "attacks and feature extraction need the model in eval mode"
        )
    return output.reshape(output.shape[0], -1)


def _cosine_distance(features: Tensor, reference: Tensor) -> Tensor:
    """Per-row ``1 - cos`` between ``features`` and the already L2-normalized ``reference``."""
    return 1.0 - (F.normalize(features.float(), dim=1) * reference).sum(dim=1)


def metric_attack(
    model: nn.Module,
    images: Tensor,
    eps: float,
    steps: int = 1,
    step_size: Optional[float] = None,
    random_start: bool = True,
    generator: Optional[torch.Generator] = None,
    pixel_min: float = 0.0,
    pixel_max: float = 255.0,
    start_radius: Optional[float] = None,
    process_share: Tuple[int, int] = (0, 1),
) -> Tensor:
    """Untargeted metric attack: push each image's embedding away from its clean embedding.

    Maximizes ``1 - cos(f(x_adv), f(x))`` by ``steps`` signed-gradient steps inside the
    L-infinity ball of radius ``eps`` around ``images`` (0-255 scale), clipped to
    ``[pixel_min, pixel_max]``. FGSM: ``steps=1`` (step ``eps``, start radius ``eps/4``); PGD-k:
    ``steps=k`` (step ``eps/4``, start radius ``eps``); ``step_size`` / ``start_radius`` override.
    The random start draws from ``generator`` (on the model's device; None: the global RNG), for
    the global batch of which ``images`` are share ``process_share`` = (rank, world size): each
    sample starts where it would in a one-process run.

    The model (a DDP wrapper is looked through: the attack is per sample and needs no gradient
    sync) runs in eval mode -- BN running statistics, no dropout, SGP hooks inactive -- and every
    submodule's mode is restored afterwards. Only the input gradient is computed
    (``torch.autograd.grad``), so the parameters' ``.grad`` are left untouched. Returns detached
    adversarial images on the model's device.

    The attack runs in fp32 even inside ``torch.autocast`` (the trainer's AMP): its input
    gradient is far below fp16's range, so under fp16 the signed step would be 0 or noise.
    """
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"attack eps must be a finite number >= 0 (0-255 scale), got {eps!r}")
    if steps < 0:
        raise ValueError(f"attack steps must be >= 0, got {steps!r}")
    if not pixel_min < pixel_max:
        raise ValueError(f"attack needs pixel_min < pixel_max, got {pixel_min!r}, {pixel_max!r}")
    if not random_start and eps > 0 and steps > 0:
        raise ValueError(
            "random_start=False: the cosine distance to the clean embedding has a zero gradient at "
            "the clean image, so the attack would not move; use random_start=True"
        )
    if step_size is None:
        step_size = eps if steps == 1 else eps / 4.0
    if start_radius is None:
        start_radius = eps / 4.0 if steps == 1 else eps
    if step_size <= 0 and eps > 0 and steps > 0:
        raise ValueError(f"attack step_size must be > 0, got {step_size!r}")
    if not 0 <= start_radius <= eps:
        raise ValueError(f"attack start_radius must be in [0, eps={eps}], got {start_radius!r}")

    module = unwrap_model(model)
    device = model_device(module)
    clean = images.detach().to(device=device, dtype=torch.float32)
    if eps == 0 or steps == 0:
        return clean.clone()

    lower = (clean - eps).clamp_(pixel_min, pixel_max)
    upper = (clean + eps).clamp_(pixel_min, pixel_max)
    modes = save_modes(module)
    module.eval()
    # fp32 even inside the trainer's autocast: the input gradient of the cosine distance is about
    # 1e-9 per pixel, below fp16's smallest subnormal (6e-8), so in fp16 its sign is 0 or noise and
    # the "adversarial" images are little more than the random start.
    try:
        with torch.autocast(device.type, enabled=False):
            with torch.no_grad():
                reference = F.normalize(embed(module, clean).float(), dim=1)
            start = draw_for_share(
                lambda lead: torch.rand((*lead, *clean.shape[1:]), generator=generator,
                                        device=device),
                clean.shape[0], process_share).mul_(2.0).sub_(1.0)
            adversarial = torch.max(torch.min(clean + start_radius * start, upper), lower)
            for _ in range(steps):
                adversarial.requires_grad_(True)
                with torch.enable_grad():
                    distance = _cosine_distance(embed(module, adversarial), reference).sum()
                    (gradient,) = torch.autograd.grad(distance, adversarial)
                with torch.no_grad():
                    adversarial = adversarial.detach() + step_size * gradient.sign()
                    adversarial = torch.max(torch.min(adversarial, upper), lower)
    finally:
        restore_modes(modes)
    return adversarial.detach()


def attack_with(budget, model: nn.Module, images: Tensor,
                generator: Optional[torch.Generator] = None,
                process_share: Tuple[int, int] = (0, 1)) -> Tensor:
    """:func:`metric_attack` with the budget of ``budget``: anything with ``eps``, ``steps``,
    ``step_size`` and ``start_radius`` (an AdversarialTraining, a robustness AttackSpec)."""
    return metric_attack(
        model,
        images,
        eps=budget.eps,
        steps=budget.steps,
        step_size=budget.step_size,
        random_start=True,
        generator=generator,
        start_radius=budget.start_radius,
        process_share=process_share,
    )
