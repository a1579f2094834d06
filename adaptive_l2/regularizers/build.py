"""The regularizers a config asks for: the L2 term attached to the model, and the ordered list of
step regularizers the training step runs.

MODEL.REG.NAME chooses the L2 term (`adaptive_l2.regularizers.adaptive`, `.conventional`, or
none); MODEL.REG.AT and MODEL.REG.SGP switch on adversarial training
(`adaptive_l2.adversarial.training`) and SGP (`adaptive_l2.regularizers.sgp`).
"""
from __future__ import annotations

import logging
from typing import List, Optional

import torch
from fastreid.utils import comm
from torch import nn

from adaptive_l2.adversarial.training import AdversarialTraining, AdversarialTrainingStep
from adaptive_l2.config import l2_term
from adaptive_l2.regularizers.adaptive import AdaptiveL2Penalty, amplitudes_from_config
from adaptive_l2.regularizers.conventional import ConventionalL2Penalty
from adaptive_l2.regularizers.l2_base import PENALTY_ATTRIBUTE, L2PenaltyBase, regularized_tensors
from adaptive_l2.regularizers.sgp import (FeatureGradientPerturbation, FeatureNoiseStep,
                                          ParameterGradientPerturbation, ParameterNoiseStep)
from adaptive_l2.regularizers.step import StepRegularizer

logger = logging.getLogger(__name__)


def _add_penalty_to_losses(module: nn.Module, inputs, output):
    if not module.training or not isinstance(output, dict):
        return output
    penalty_module = getattr(module, PENALTY_ATTRIBUTE)
    losses = dict(output)
    losses[penalty_module.loss_name] = penalty_module.penalty()
    return losses


def attach_l2_penalty(model: nn.Module, cfg) -> Optional[L2PenaltyBase]:
    """Attach the penalty the config asks for to `model` (as `model.l2_penalty`); None if off.

    The model's training forward then returns its loss dict plus the penalty's entry.
    """
    reg = cfg.MODEL.REG
    term, _ = l2_term(cfg)
    if term == "none":
        return None
    if hasattr(model, PENALTY_ATTRIBUTE):
        raise ValueError("the model already carries an L2 penalty")
    targets = regularized_tensors(model)
    if term == "adaptive":
        penalty = AdaptiveL2Penalty(targets, amplitudes_from_config(reg))
    else:
        penalty = ConventionalL2Penalty(targets, reg.CONVENTIONAL.FACTOR)
    penalty.decoupled = bool(reg.DECOUPLED)
    model.add_module(PENALTY_ATTRIBUTE, penalty)
    model.register_forward_hook(_add_penalty_to_losses)
    logger.info("%s on %d tensors", type(penalty).__name__, len(penalty.entries))
    return penalty


def build_step_regularizers(cfg, model: nn.Module) -> List[StepRegularizer]:
    """The step regularizers of MODEL.REG, in the order the step runs them: adversarial training
    (it computes the step's losses), then SGP (feature sites hooked on `model`, or the parameter
    gradients). Each draws from its own stream keyed by the iteration, seeded alike on every
    process (AT.SEED, SGP.SEED); AT and SGP-F draw for the global batch and keep this process's
    rows, so k processes perturb and attack each sample as one process does."""
    reg = cfg.MODEL.REG
    regularizers: List[StepRegularizer] = []
    # every process seeds SGP-F and AT alike and draws for the global batch (draw_for_share)
    share = (comm.get_rank(), comm.get_world_size())
    if reg.AT.ENABLED:
        training = AdversarialTraining(eps=reg.AT.EPS, steps=reg.AT.STEPS, adv_weight=reg.AT.WEIGHT,
                                       process_share=share)
        regularizers.append(AdversarialTrainingStep(
            training, torch.device(cfg.MODEL.DEVICE), seed=reg.AT.SEED))
    if reg.SGP.ENABLED:
        logger.info("SGP (reconstructed from the abstract): mode %s, alpha %g, noise %s",
                    reg.SGP.MODE, reg.SGP.ALPHA, reg.SGP.NOISE)
        if reg.SGP.MODE == "feature":
            noise = FeatureGradientPerturbation(
                model, sites=tuple(reg.SGP.SITES), alpha=reg.SGP.ALPHA, prob=reg.SGP.PROB,
                noise=reg.SGP.NOISE, seed=reg.SGP.SEED, rank=share[0], world_size=share[1],
                samples_per_process=cfg.SOLVER.IMS_PER_BATCH // share[1])
            regularizers.append(FeatureNoiseStep(noise, reg.SGP.START_ITER))
        else:
            noise = ParameterGradientPerturbation(
                alpha=reg.SGP.ALPHA, prob=reg.SGP.PROB, noise=reg.SGP.NOISE, seed=reg.SGP.SEED)
            regularizers.append(ParameterNoiseStep(noise, reg.SGP.START_ITER))
    return regularizers
