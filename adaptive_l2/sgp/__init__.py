"""Stochastic Gradient Perturbation, SGP (reconstructed from the abstract), and its comparators.

Zhou, Huang, Chen, Pu, Zhang, "Stochastic Gradient Perturbation: An Implicit Regularizer for Person
Re-Identification", IEEE TCSVT 33(10), 2023. Only the abstract is public and the code was never
released: every equation, default and protocol here is the project's reconstruction from that
abstract (``shared/reference/sgp.md``), not the authors' method.

* :mod:`~adaptive_l2.sgp.perturbation` -- SGP-F (feature-gradient perturbation, the default) and
  SGP-P (parameter-gradient perturbation, an ablation);
* :mod:`~adaptive_l2.sgp.adversarial` -- metric FGSM / PGD attacks and the adversarial-training
  baseline;
* :mod:`~adaptive_l2.sgp.robustness` -- Rank-1 / mAP clean and under attack on the query images.
"""
from adaptive_l2.sgp.adversarial import AdversarialTraining, embed, metric_attack, model_device
from adaptive_l2.sgp.perturbation import (
    NOISE_KINDS,
    FeatureGradientPerturbation,
    ParameterGradientPerturbation,
    perturb_gradient,
)
from adaptive_l2.sgp.robustness import (
    STANDARD_ATTACKS,
    AttackSpec,
    RobustnessResult,
    evaluate_robustness,
    format_robustness_comparison,
    format_robustness_table,
)

__all__ = [
    "NOISE_KINDS",
    "STANDARD_ATTACKS",
    "AdversarialTraining",
    "AttackSpec",
    "FeatureGradientPerturbation",
    "ParameterGradientPerturbation",
    "RobustnessResult",
    "embed",
    "evaluate_robustness",
    "format_robustness_comparison",
    "format_robustness_table",
    "metric_attack",
    "model_device",
    "perturb_gradient",
]
