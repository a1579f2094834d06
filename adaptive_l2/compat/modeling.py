"""Patches of fast-reid's models and losses: no in-place writes into the caller's batch, no host
sync per step, triplet mining over the global batch in fp32."""
from __future__ import annotations

import importlib
from typing import List

import torch


def patch_inplace_normalization() -> List[str]:
    """Normalize input images out of place in fast-reid's Baseline and MGN.

    Their `preprocess_image` runs `images.sub_(mean).div_(std)` on the caller's batch. The
    evaluator's flip test (TEST.FLIP.ENABLED) then flips the already normalized images and the
    model normalizes them a second time, so flip-averaged features are wrong; an adversarial attack
    or a second forward pass over the same batch meets the same trap.

    The replacement also honours MODEL.PIXEL_FORMAT "BGR" (the model's `pixel_format`, set by
    `adaptive_l2.modeling.backbone_options.apply_backbone_options`): caffe-style weights expect
    BGR channels.
    """
    from fastreid.modeling.meta_arch.baseline import Baseline
    from fastreid.modeling.meta_arch.mgn import MGN

    from adaptive_l2.modeling.backbone_options import normalize_pixels

    def preprocess_image(self, batched_inputs):
        return normalize_pixels(batched_inputs, self.pixel_mean, self.pixel_std,
                                getattr(self, "pixel_format", "RGB"))

    Baseline.preprocess_image = preprocess_image
    MGN.preprocess_image = preprocess_image
    return ["out_of_place_normalization"]


def patch_baseline_targets_without_sync() -> List[str]:
    """Train fast-reid's Baseline without a host sync and without zeroing the caller's targets.

    Its training forward runs `if targets.sum() < 0: targets.zero_()` (fast-reid's PreciseBN pass
    sets every target to -1): the Python `if` waits for the GPU at every step, and `zero_` writes
    into the caller's batch. The same rule is applied on the device with `masked_fill`. Evaluation
    is the host's forward unchanged.
    """
    from fastreid.modeling.meta_arch.baseline import Baseline

    host_forward = Baseline.forward

    def forward(self, batched_inputs):
        if not self.training:
            return host_forward(self, batched_inputs)
        if not isinstance(batched_inputs, dict) or "targets" not in batched_inputs:
            raise ValueError("Baseline in training mode needs a dict with 'targets' (person IDs); "
                             "call model.eval() to extract features")
        features = self.backbone(self.preprocess_image(batched_inputs))
        targets = batched_inputs["targets"].to(features.device)
        targets = targets.masked_fill(targets.sum() < 0, 0)  # PreciseBN: all -1 -> all 0
        return self.losses(self.heads(features, targets), targets)

    forward.host = host_forward
    Baseline.forward = forward
    return ["baseline_targets_without_sync"]


def patch_triplet_loss_global_batch() -> List[str]:
    """fast-reid's `triplet_loss` mines over the global batch of all processes, in fp32.

    - With several processes, fast-reid 1.4.0 mines each process's share only (its gather is
      commented out): P x K = 16 x 4 becomes 4 x 4 on 4 GPUs, and 0 with one identity per
      process. Here each process's anchors are mined against every process's embeddings
      (`adaptive_l2.global_batch`), so k processes compute one process's loss.
    - Under autocast the distance matrix ran in fp16 (self-distances up to 0.7, hardest
      positives changed): it is computed in fp32.
    - `if loss == float('Inf')` synchronised the host every step: the fallback to the margin
      ranking loss is chosen on the device.
    """
    import torch.nn.functional as F

    import importlib

    import fastreid.modeling.losses as losses_package
    import fastreid.modeling.meta_arch.baseline as baseline
    import fastreid.modeling.meta_arch.mgn as mgn

    # the package re-exports a function of the module's name: fetch the module itself
    triplet_module = importlib.import_module("fastreid.modeling.losses.triplet_loss")

    from adaptive_l2.global_batch import metric_loss_candidates

    def triplet_loss(embedding, targets, margin, norm_feat, hard_mining):
        candidates, candidate_targets = metric_loss_candidates(embedding, targets)
        with torch.autocast(device_type=embedding.device.type, enabled=False):
            anchors, candidates = embedding.float(), candidates.float()
            distance = triplet_module.cosine_dist if norm_feat else triplet_module.euclidean_dist
            dist_mat = distance(anchors, candidates)
            is_pos = targets[:, None].eq(candidate_targets[None, :]).float()
            is_neg = 1.0 - is_pos
            mining = (triplet_module.hard_example_mining if hard_mining
                      else triplet_module.weighted_example_mining)
            dist_ap, dist_an = mining(dist_mat, is_pos, is_neg)
            ones = torch.ones_like(dist_an)
            if margin > 0:
                return F.margin_ranking_loss(dist_an, dist_ap, ones, margin=margin)
            loss = F.soft_margin_loss(dist_an - dist_ap, ones)
            fallback = F.margin_ranking_loss(dist_an, dist_ap, ones, margin=0.3)
            return torch.where(torch.isinf(loss), fallback, loss)

    for module in (triplet_module, losses_package, baseline, mgn):
        module.triplet_loss = triplet_loss
    return ["triplet_loss_global_batch_fp32"]
