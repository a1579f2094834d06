"""Adversarial training (AT) for re-ID, the comparator of SGP (reconstructed from the abstract).

SGP's abstract motivates it against adversarial training for metric learning (Bai et al., TPAMI
2020; Bouniot et al., CVPRW 2020): perturb the input images inside an L-infinity ball so that the
embedding moves as far as possible (:func:`adaptive_l2.adversarial.attacks.metric_attack`), and
train on those images too. :class:`AdversarialTraining` gives the losses of a clean + adversarial
batch; :class:`AdversarialTrainingStep` runs it in the trainer's step (MODEL.REG.AT), its random
starts drawn from a stream keyed by the iteration.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from adaptive_l2.adversarial.attacks import attack_with
from adaptive_l2.global_batch import check_process_share
from adaptive_l2.regularizers.step import StepRegularizer, iteration_seed

__all__ = ["AdversarialTraining", "AdversarialTrainingStep"]


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
        process_share: (rank, world size): the random starts are drawn for the global batch.
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
        """Adversarial versions of ``images`` against the current model (detached); the random
        start is required (``random_start`` is checked True at construction)."""
        return attack_with(self, model, images, generator, self.process_share)

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


class AdversarialTrainingStep(StepRegularizer):
    """AT in the training step: the step's losses are those of the clean + adversarial batch (the
    attack runs in fp32, its training forward under the step's AMP), the attack's random start
    drawn from a generator on the model's device re-seeded with (seed, iteration) at each step."""

    replaces_forward = True

    def __init__(self, training: AdversarialTraining, device: torch.device, seed: int = 0) -> None:
        self.training = training
        self.generator = torch.Generator(device=device)
        self.seed = int(seed)

    def before_step(self, iteration: int) -> None:
        self.generator.manual_seed(iteration_seed(self.seed, iteration))

    def losses(self, model: nn.Module, data: Mapping[str, object]) -> Dict[str, Tensor]:
        return self.training.losses(model, data, self.generator)
