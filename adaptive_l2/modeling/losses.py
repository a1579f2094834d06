"""Losses of the two-branch model of Ni et al. (ICPR 2020).

fast-reid's `triplet_loss` has a margin and optional feature normalisation; the paper's model uses
the soft-margin variant (no margin, no normalisation) on clipped features, so it gets its own
function here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from adaptive_l2.global_batch import metric_loss_candidates

# Squared distances are clamped to this before the square root: d/dx sqrt(x) is infinite at 0,
# and every anchor has distance 0 to itself.
_MIN_SQUARED_DISTANCE = 1e-12


def pairwise_euclidean(features: torch.Tensor, others: torch.Tensor = None) -> torch.Tensor:
    """Euclidean distances (fp32) between the rows of ``features`` and of ``others`` (default:
    the same rows), with a finite gradient at 0.

    Always fp32, also inside ``torch.autocast``: the distance is a difference of large squared
    norms (about 170 for 512 clipped features), which fp16's 3 significant digits turn into
    self-distances up to 0.7 and different hardest positives / negatives.
    """
    others = features if others is None else others
    with torch.autocast(features.device.type, enabled=False):
        features, others = features.float(), others.float()
        squared = (features.pow(2).sum(dim=1)[:, None] + others.pow(2).sum(dim=1)[None, :]
                   - 2.0 * features @ others.t())
        return squared.clamp(min=_MIN_SQUARED_DISTANCE).sqrt()


def soft_margin_batch_hard_triplet(features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Soft-margin batch-hard triplet loss: ``mean_a softplus(max_p d(a, p) - min_n d(a, n))``.

    For each anchor the farthest sample with its label (itself if it is alone in the batch) and
    the nearest sample with another label are picked; softplus replaces the hinge, so no margin
    has to be tuned (Hermans et al. 2017, as in the paper's code). An anchor without any negative
    in the batch contributes 0, so a batch of one identity (fast-reid's PreciseBN pass) gives a
    finite loss instead of an error.
    """
    if features.dim() != 2:
        raise ValueError(
            f"soft_margin_batch_hard_triplet expects features of shape (batch, dim), "
            f"got {tuple(features.shape)}"
        )
    if targets.shape != features.shape[:1]:
        raise ValueError(
            f"soft_margin_batch_hard_triplet expects one target per feature row: features "
            f"{tuple(features.shape)}, targets {tuple(targets.shape)}"
        )
    # anchors: this process's rows; candidates: the global batch (see adaptive_l2.global_batch)
    candidates, candidate_targets = metric_loss_candidates(features, targets)
    distances = pairwise_euclidean(features, candidates)  # fp32 under autocast too
    same_identity = targets[:, None] == candidate_targets[None, :]
    hardest_positive = distances.masked_fill(~same_identity, float("-inf")).amax(dim=1)
    hardest_negative = distances.masked_fill(same_identity, float("inf")).amin(dim=1)
    return F.softplus(hardest_positive - hardest_negative).mean()
