"""Regularizers, one module each.

* `adaptive` -- the paper's adaptive L2 term (`AdaptiveL2Penalty`, one trainable factor a tensor);
* `conventional` -- the constant L2 term (`ConventionalL2Penalty`);
* `l2_base` -- what both share: covered tensors, squared norms, weight gradient, decoupled decay,
  the factor log (`L2FactorLogger`);
* `sgp` -- SGP-F and SGP-P (reconstructed from the abstract), and their step regularizers;
* `step` -- the protocol of a step regularizer (`StepRegularizer`) and the iteration-keyed seeds;
* `build` -- what a config asks for: `attach_l2_penalty`, `build_step_regularizers`.

Adversarial training, also a step regularizer, is `adaptive_l2.adversarial` (so `build`, which
imports it, is not imported here: `adaptive_l2.adversarial` imports `step`).
"""
from adaptive_l2.regularizers.adaptive import AdaptiveL2Penalty, hard_sigmoid_keras
from adaptive_l2.regularizers.conventional import ConventionalL2Penalty
from adaptive_l2.regularizers.l2_base import find_l2_penalty, regularized_tensors
from adaptive_l2.regularizers.step import StepRegularizer

__all__ = [
    "AdaptiveL2Penalty",
    "ConventionalL2Penalty",
    "StepRegularizer",
    "find_l2_penalty",
    "hard_sigmoid_keras",
    "regularized_tensors",
]
