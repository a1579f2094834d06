"""Regularizers of the training step itself, and the random streams they draw from.

The L2 terms are part of the model (a loss entry); the regularizers here act on the step around
it: adversarial training replaces the forward by the losses of a clean + adversarial batch, SGP-F
perturbs the gradients arriving at feature sites, SGP-P the parameter gradients before the
optimizer step. `adaptive_l2.trainer.TrainStep` runs an ordered list of them
(`adaptive_l2.regularizers.build.build_step_regularizers`), calling at each iteration

1. `before_step(iteration)` on each, in order, before the batch is read;
2. `losses(model, data)` of the one that `replaces_forward` (at most one), else `model(data)`;
3. backward, then the loss metrics;
4. `after_backward(step)` on each, in order: gradients are final (synchronized across
   processes, still scaled under AMP unless `step.unscale_gradients()`); log here.

Their randomness comes from streams keyed by (seed, iteration) (`iteration_seed`): nothing needs
saving in a checkpoint, and a run resumed at any iteration draws what the uninterrupted one drew.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict

import torch
from torch import nn

from adaptive_l2.seeds import derived_seed

if TYPE_CHECKING:
    from adaptive_l2.trainer import TrainStep


def iteration_seed(seed: int, iteration: int) -> int:
    """The seed of a random stream at one training iteration: a stream keyed by the iteration
    needs no saved state, so a resumed run draws what the uninterrupted one drew."""
    return derived_seed([seed, iteration], bits=63)


class StepRegularizer:
    """One regularizer of the training step (see the module docstring for when each hook runs)."""

    # True: `losses` computes the step's loss dict in place of the model's forward
    replaces_forward = False

    def before_step(self, iteration: int) -> None:
        """Before the batch is read: key the random streams by `iteration`, switch on or off."""

    def losses(self, model: nn.Module, data: Dict[str, object]) -> Dict[str, torch.Tensor]:
        """The step's loss dict (only for a regularizer that `replaces_forward`)."""
        raise NotImplementedError(f"{type(self).__name__} does not replace the forward")

    def after_backward(self, step: "TrainStep") -> None:
        """After the backward and the loss metrics, before the optimizer step."""
