"""Adversarial training (AT) for re-ID, the comparator of SGP (reconstructed from the abstract).

SGP's abstract motivates it against adversarial training for metric learning (Bai et al., TPAMI
2020; Bouniot et al., CVPRW 2020): perturb the input images inside an L-infinity ball so that the
embedding moves as far as possible, and train on those images too. This module gives

* :func:`metric_attack` -- an untargeted FGSM / PGD attack on the embedding, also used by the
  robustness evaluation (:mod:`adaptive_l2.sgp.robustness`);
* :class:`AdversarialTraining` -- the AT baseline: the losses of a clean + adversarial batch.

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
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaptive_l2.global_batch import check_process_share, draw_for_share
from adaptive_l2.sgp.perturbation import _unwrap

__all__ = ["AdversarialTraining", "embed", "metric_attack", "model_device"]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for an empty model); a DDP
    wrapper is looked through. Attacks and autocast follow it instead of assuming CUDA."""
    model = _unwrap(model)
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _save_modes(model: nn.Module) -> List[Tuple[nn.Module, bool]]:
    return [(module, module.training) for module in model.modules()]


def _restore_modes(modes: List[Tuple[nn.Module, bool]]) -> None:
    # Per module, not model.train(mode): children frozen in eval mode (LayerFreeze) stay so.
    for module, training in modes:
        module.training = training


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

    module = _unwrap(model)
    device = model_device(module)
    clean = images.detach().to(device=device, dtype=torch.float32)
    if eps == 0 or steps == 0:
        return clean.clone()

    lower = (clean - eps).clamp_(pixel_min, pixel_max)
    upper = (clean + eps).clamp_(pixel_min, pixel_max)
    modes = _save_modes(module)
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
        _restore_modes(modes)
    return adversarial.detach()


def _duplicate_batch(
    batched_inputs: Mapping[str, object], adversarial: Tensor
) -> Dict[str, object]:
    """Clean + adversarial batch: images concatenated, per-sample entries repeated."""
    images = batched_inputs["images"]
    assert isinstance(images, Tensor)
    size = images.shape[0]
    batch: Dict[str, object] = {}
    for key, value in batched_inputs.items():
        if key == "images":
            batch[key] = torch.cat((images.to(adversarial.device, adversarial.dtype), adversarial))
        elif isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == size:
            batch[key] = torch.cat((value, value))
        elif isinstance(value, (list, tuple)) and len(value) == size:
            batch[key] = type(value)(list(value) + list(value))
        else:
            batch[key] = value
    return batch


@dataclass(frozen=True)
class AdversarialTraining:
    """Adversarial training baseline, the comparator of SGP (reconstructed from the abstract).

    Each step attacks the current model with :func:`metric_attack` (eval mode, the model's modes
    restored after) and trains on the clean and the adversarial images. With ``adv_weight == 1``
    the two are concatenated into one batch of 2B images (one training forward: BN statistics and
    triplet mining see both halves; DDP-safe) and the model's loss dict is returned unchanged. With
    another weight the halves go through two training forwards and the adversarial losses come back
    as ``<name>_adv`` scaled by ``adv_weight`` (two forwards before one backward: not usable under
    DDP unless its graph is static).

    Cost per step, relative to the baseline's forward + backward on B images: one no-grad forward
    for the clean embedding, ``steps`` forward + backward passes for the attack, and a training
    pass on 2B images: about 2x-3x for FGSM and (k+1)x-(k+2)x for PGD-k.

    Args:
        eps: L-infinity budget on the 0-255 scale.
        steps: 1 for FGSM, k for PGD-k.
        step_size: None: eps for FGSM, eps/4 for PGD.
        random_start: must be True (see :func:`metric_attack`).
        start_radius: None: eps/4 for FGSM, eps for PGD.
        adv_weight: weight of the adversarial losses (1: one concatenated batch).
    """

    eps: float = 4.0
    steps: int = 1
    step_size: Optional[float] = None
    random_start: bool = True
    start_radius: Optional[float] = None
    adv_weight: float = 1.0
    process_share: Tuple[int, int] = (0, 1)

    def __post_init__(self) -> None:
        check_process_share(self.process_share)  # refused here, not mid-training
        if not math.isfinite(self.eps) or self.eps <= 0:
            raise ValueError(f"AdversarialTraining eps must be > 0 (0-255 scale), got {self.eps!r}")
        if self.steps < 1:
            raise ValueError(f"AdversarialTraining steps must be >= 1, got {self.steps!r}")
        if not math.isfinite(self.adv_weight) or self.adv_weight <= 0:
            raise ValueError(f"AdversarialTraining adv_weight must be > 0, got {self.adv_weight!r}")
        if not self.random_start:
            raise ValueError(
                "AdversarialTraining random_start=False: the attack needs a random start "
                "(zero gradient at the clean image)"
            )

    def attack(
        self, model: nn.Module, images: Tensor, generator: Optional[torch.Generator] = None
    ) -> Tensor:
        """Adversarial versions of ``images`` against the current model (detached)."""
        return metric_attack(
            model,
            images,
            eps=self.eps,
            steps=self.steps,
            step_size=self.step_size,
            random_start=self.random_start,
            generator=generator,
            start_radius=self.start_radius,
            process_share=self.process_share,
        )

    def losses(
        self,
        model: nn.Module,
        batched_inputs: Mapping[str, object],
        generator: Optional[torch.Generator] = None,
    ) -> Dict[str, Tensor]:
        """Training losses on the clean and adversarial batch; the caller sums and backpropagates.

        ``model`` must be in training mode (as in the trainer's step); ``batched_inputs`` is not
        modified.
        """
        if not model.training:
            raise RuntimeError("AdversarialTraining.losses needs the model in training mode")
        images = batched_inputs["images"]
        if not isinstance(images, Tensor):
            raise TypeError(
                f"batched_inputs['images'] must be a tensor, got {type(images).__name__}"
            )
        adversarial = self.attack(model, images, generator)
        if self.adv_weight == 1.0:
            return _checked_losses(model(_duplicate_batch(batched_inputs, adversarial)))
        clean_batch = dict(batched_inputs)
        clean_batch["images"] = images.to(adversarial.device, adversarial.dtype).clone()
        adversarial_batch = dict(batched_inputs)
        adversarial_batch["images"] = adversarial
        losses = dict(_checked_losses(model(clean_batch)))
        for name, value in _checked_losses(model(adversarial_batch)).items():
            losses[f"{name}_adv"] = value * self.adv_weight
        return losses


def _checked_losses(output: object) -> Dict[str, Tensor]:
    if not isinstance(output, Mapping):
        raise TypeError(
            f"the model returned {type(output).__name__} in training mode, "
            "expected a dict of losses"
        )
    return dict(output)
