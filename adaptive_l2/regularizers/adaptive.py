"""The paper's adaptive L2 term (Ni et al. 2020): one trainable factor per tensor of the model.

penalty = sum_n A_n * hard_sigmoid(theta_n) * ||W_n||^2, with theta_n a model parameter (init 0)
trained by the same optimizer as the weights, and A_n the amplitude of the tensor's kind
(MODEL.REG.AMPLITUDE, or MODEL.REG.AMPLITUDE_PER_KIND). Its value, its weight gradient
(2 * lambda_n * W_n, through autograd or the project optimizer's fused pass) and its decoupled
decay come from `L2PenaltyBase`; this module owns the factors lambda_n = A_n * hard_sigmoid(theta_n)
and what the factor log records of them (the thetas, and the factors that reached 0 for good).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from adaptive_l2.regularizers.l2_base import KINDS, L2PenaltyBase

# Hard-sigmoid of old Keras (slope 0.2, saturating at theta = -2.5 and 2.5). Not torch's
# `hardsigmoid`, whose slope is 1/6.
HARD_SIGMOID_SLOPE = 0.2
THETA_DEAD = -2.5  # at or below this theta the factor is 0 and its gradient 0: it never moves again


def hard_sigmoid_keras(theta: torch.Tensor) -> torch.Tensor:
    return torch.clamp(HARD_SIGMOID_SLOPE * theta + 0.5, 0.0, 1.0)


class AdaptiveL2Penalty(L2PenaltyBase):
    """sum_n A_n * hard_sigmoid(theta_n) * ||W_n||^2 with one trainable theta_n (init 0) per tensor."""

    loss_name = "loss_adaptive_l2"

    def __init__(self, targets, amplitudes: Dict[str, float]):
        super().__init__(targets)
        missing = set(KINDS) - set(amplitudes)
        if missing:
            raise ValueError(f"amplitudes lack the kinds {sorted(missing)}")
        device = self.device
        self.thetas = nn.ParameterList(
            [nn.Parameter(torch.zeros((), device=device)) for _ in self.entries])
        self._theta_list = list(self.thetas)  # iterating a ParameterList costs ~2 us a theta
        self.register_buffer(
            "amplitudes",
            torch.tensor([float(amplitudes[e.kind]) for e in self.entries], device=device),
            persistent=False)

    def theta_vector(self) -> torch.Tensor:
        return torch.stack(self._theta_list).float()

    def factors(self) -> torch.Tensor:
        """lambda_n = A_n * hard_sigmoid(theta_n), detached, fp32."""
        with torch.no_grad():
            return self.amplitudes * hard_sigmoid_keras(self.theta_vector())

    def penalty(self) -> torch.Tensor:
        weighted = self.amplitudes * hard_sigmoid_keras(self.theta_vector())
        return torch.dot(weighted, self.squared_norms())

    def theta_parameters(self) -> List[nn.Parameter]:
        return list(self._theta_list)

    def logged_thetas(self) -> torch.Tensor:
        return self.theta_vector().detach().cpu()

    def dead_factors_warning(self, thetas: torch.Tensor) -> Optional[str]:
        dead = int((thetas <= THETA_DEAD).sum())
        if not dead:
            return None
        return (f"{dead} of {len(thetas)} adaptive L2 factors reached 0 for good "
                f"(theta <= {THETA_DEAD:.1f})")


def amplitudes_from_config(reg_cfg) -> Dict[str, float]:
    """A_n per tensor kind: MODEL.REG.AMPLITUDE_PER_KIND where set (>= 0), else MODEL.REG.AMPLITUDE."""
    per_kind = reg_cfg.AMPLITUDE_PER_KIND
    chosen = {
        "kernel": per_kind.KERNEL, "bias": per_kind.BIAS,
        "norm_weight": per_kind.NORM_WEIGHT, "norm_bias": per_kind.NORM_BIAS,
    }
    return {kind: (value if value >= 0 else reg_cfg.AMPLITUDE) for kind, value in chosen.items()}
