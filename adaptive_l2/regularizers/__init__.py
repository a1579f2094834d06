"""Regularizers attached to fast-reid models."""
from adaptive_l2.regularizers.l2 import (
    AdaptiveL2Penalty,
    ConventionalL2Penalty,
    attach_l2_penalty,
    find_l2_penalty,
    hard_sigmoid_keras,
    regularized_tensors,
)

__all__ = [
    "AdaptiveL2Penalty",
    "ConventionalL2Penalty",
    "attach_l2_penalty",
    "find_l2_penalty",
    "hard_sigmoid_keras",
    "regularized_tensors",
]
