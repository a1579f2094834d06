"""Metric attacks on re-ID embeddings and adversarial training, the comparator of SGP
(reconstructed from the abstract; ``shared/reference/sgp.md``).

* :mod:`~adaptive_l2.adversarial.attacks` -- untargeted FGSM / PGD on the embedding;
* :mod:`~adaptive_l2.adversarial.training` -- the adversarial-training baseline (MODEL.REG.AT).

The robustness evaluation that uses the attacks is :mod:`adaptive_l2.evaluation.robustness`.
"""
from adaptive_l2.adversarial.attacks import attack_with, embed, metric_attack
from adaptive_l2.adversarial.training import AdversarialTraining, AdversarialTrainingStep

__all__ = ["AdversarialTraining", "AdversarialTrainingStep", "attack_with", "embed", "metric_attack"]
