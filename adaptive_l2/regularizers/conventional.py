"""The constant L2 term, the paper's "Conventional L2" row (Keras l2(0.005)).

penalty = factor * sum_n ||W_n||^2 over every trainable tensor (MODEL.REG.CONVENTIONAL.FACTOR).
Its factors are constants, so the factor log records them without thetas.
"""
from __future__ import annotations

import torch

from adaptive_l2.regularizers.l2_base import L2PenaltyBase


class ConventionalL2Penalty(L2PenaltyBase):
    """factor * sum_n ||W_n||^2: the paper's "Conventional L2" row (Keras l2(0.005))."""

    loss_name = "loss_l2"

    def __init__(self, targets, factor: float):
        super().__init__(targets)
        self.factor = float(factor)
        self.register_buffer(
            "factor_vector", torch.full((len(self.entries),), self.factor, device=self.device),
            persistent=False)

    def factors(self) -> torch.Tensor:
        return self.factor_vector

    def penalty(self) -> torch.Tensor:
        return self.factor * self.squared_norms().sum()

    @torch.no_grad()
    def add_weight_gradients(self, owner: object) -> None:
        """One factor for all: a Python scalar, so CUDA runs torch's fused multi-tensor kernel."""
        self._check_owner(owner)
        for _, grads, weights in self._grouped_gradients().values():
            torch._foreach_add_(grads, weights, alpha=2.0 * self.factor)
