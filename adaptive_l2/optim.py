"""Optimizer construction that really trains on torch 2.

fast-reid's `build_optimizer` defaults to `contiguous=True`: parameters become views of one flat
buffer per group, and on torch 2 `zero_grad()` sets that buffer's grad to None, so `step()` skips
it: the weights never change (fast-reid issues #700, #704, #735, #750). Here every parameter keeps
its own tensor, in fast-reid's own per-parameter groups (learning-rate factors, freeze status),
with fast-reid's gradient-clipping wrapper, and with a freeze wrapper whose on/off state is set by
a hook from the trainer's iteration (fast-reid's counts its own steps, which restart at 0 when a run
is resumed).

With an L2 penalty on, weight decay is switched off in every group: the penalty already covers
every tensor, and fast-reid's default SOLVER.WEIGHT_DECAY (5e-4) would penalize them twice.
"""
from __future__ import annotations

import logging
import re
from typing import Callable, Dict, List, Tuple, Type

import torch
from fastreid.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from torch import nn

from adaptive_l2.config import regularizer_enabled
from adaptive_l2.keras_adam import KerasAdam
from adaptive_l2.regularizers.adaptive import AdaptiveL2Penalty
from adaptive_l2.regularizers.l2_base import L2PenaltyBase, find_l2_penalty

logger = logging.getLogger(__name__)

FREEZE = "freeze"


def with_layer_freeze(optimizer_class: Type[torch.optim.Optimizer]) -> Type[torch.optim.Optimizer]:
    """Subclass whose `step` runs `before_step` once, then skips the groups marked "freeze" while
    `freeze_active` is True."""

    class OptimizerWithLayerFreeze(optimizer_class):
        freeze_active = False
        # called with the optimizer once at the start of every step (after GradScaler's unscale):
        # the L2 penalty's weight gradient. Not a torch step pre-hook: torch runs those once per
        # wrapped class in the step chain, twice here if a plain optimizer of the base class was
        # created before.
        before_step = None

        @torch.no_grad()
        def step(self, closure=None):
            if self.before_step is not None:
                self.before_step(self)
            if not self.freeze_active:
                return super().step(closure)
            held = []
            for group in self.param_groups:
                if group.get("freeze_status") == FREEZE:
                    for param in group["params"]:
                        if param.grad is not None:
                            held.append((param, param.grad))
                            param.grad = None
            try:
                return super().step(closure)
            finally:
                for param, grad in held:
                    param.grad = grad

    OptimizerWithLayerFreeze.__name__ = optimizer_class.__name__ + "WithLayerFreeze"
    return OptimizerWithLayerFreeze


def _freeze_patterns(cfg) -> List[re.Pattern]:
    if cfg.SOLVER.FREEZE_ITERS <= 0:
        return []
    return [re.compile(name) for name in cfg.MODEL.FREEZE_LAYERS]


def build_param_groups(cfg, model: nn.Module) -> List[Dict]:
    """fast-reid's per-parameter groups plus the adaptive thetas, merged by hyper-parameters.

    A theta gets the base learning rate times MODEL.REG.THETA_LR_SCALE (1: the paper), no weight
    decay, and the freeze status of its tensor. The scheduler scales each group's own learning
    rate, so the thetas keep that ratio to the weights through warm-up and decay.
    """
    groups = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        heads_lr_factor=cfg.SOLVER.HEADS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
        freeze_layers=cfg.MODEL.FREEZE_LAYERS if cfg.SOLVER.FREEZE_ITERS > 0 else [],
    )
    penalty = find_l2_penalty(model)
    if regularizer_enabled(cfg):
        decayed = sorted({g["weight_decay"] for g in groups if g.get("weight_decay", 0) != 0})
        if decayed:
            logger.warning(
                "MODEL.REG penalizes every tensor already: SOLVER.WEIGHT_DECAY / "
                "WEIGHT_DECAY_BIAS / WEIGHT_DECAY_NORM (here %s) are set to 0 for all groups.",
                decayed)
        for group in groups:
            group["weight_decay"] = 0.0
    if isinstance(penalty, AdaptiveL2Penalty):
        theta_ids = {id(t) for t in penalty.thetas}
        groups = [g for g in groups if id(g["params"][0]) not in theta_ids]
        patterns = _freeze_patterns(cfg)
        for entry, theta in zip(penalty.entries, penalty.thetas):
            frozen = any(p.match(entry.name) for p in patterns)
            groups.append({
                "params": [theta], "lr": cfg.SOLVER.BASE_LR * cfg.MODEL.REG.THETA_LR_SCALE,
                "weight_decay": 0.0,
                "freeze_status": FREEZE if frozen else "normal", "is_theta": True,
            })
    return merge_equal_groups(groups)


def merge_equal_groups(groups: List[Dict]) -> List[Dict]:
    """One group per distinct set of hyper-parameters, so torch's multi-tensor (foreach) optimizer
    kernels run over many tensors at once instead of once per tensor."""
    merged: Dict[tuple, Dict] = {}
    for group in groups:
        key = tuple(sorted((k, v) for k, v in group.items() if k != "params"))
        if key not in merged:
            merged[key] = {**group, "params": []}
        merged[key]["params"].extend(group["params"])
    return list(merged.values())


def build_optimizer(cfg, model: nn.Module) -> Tuple[torch.optim.Optimizer, None]:
    """Returns (optimizer, None): the None stands where fast-reid returns its ContiguousParams."""
    groups = build_param_groups(cfg, model)
    name = cfg.SOLVER.OPT
    if not hasattr(torch.optim, name):
        raise ValueError(f"SOLVER.OPT '{name}' is not an optimizer of torch.optim")
    base_class = getattr(torch.optim, name)
    if cfg.SOLVER.ADAM_GLOBAL_STEP:
        if name != "Adam":
            raise ValueError(f"SOLVER.ADAM_GLOBAL_STEP True needs SOLVER.OPT 'Adam', got '{name}'")
        base_class = KerasAdam  # one step count for all tensors, as the original's Keras Adam
    optimizer_class = with_layer_freeze(maybe_add_gradient_clipping(cfg, base_class))
    kwargs = {}
    if name == "SGD":
        kwargs = {"momentum": cfg.SOLVER.MOMENTUM, "nesterov": cfg.SOLVER.NESTEROV}
    elif name in ("Adam", "AdamW"):
        kwargs = {"eps": cfg.SOLVER.ADAM_EPS}
    optimizer = optimizer_class(groups, lr=cfg.SOLVER.BASE_LR, **kwargs)
    penalty = find_l2_penalty(model)
    if penalty is not None:
        # the penalty's weight gradient, added in one fused pass once the data gradients are final
        # instead of by autograd (see regularizers.l2_base); the claim makes it count once
        penalty.claim_weight_gradient(optimizer)
        optimizer.before_step = decoupled_decay_step(penalty) if penalty.decoupled \
            else penalty.add_weight_gradients
    return optimizer, None


def decoupled_decay_step(penalty: L2PenaltyBase) -> Callable[[torch.optim.Optimizer], None]:
    """`before_step` of MODEL.REG.DECOUPLED: the decay with each group's lr, none for the groups
    frozen at this step (their tensors do not move, as in the coupled mode)."""

    def before_step(optimizer: torch.optim.Optimizer) -> None:
        frozen = getattr(optimizer, "freeze_active", False)
        groups = [(group["lr"], group["params"]) for group in optimizer.param_groups
                  if not (frozen and group.get("freeze_status") == FREEZE)]
        penalty.apply_decoupled_decay(optimizer, groups)

    return before_step
