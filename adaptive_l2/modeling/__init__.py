"""Models of the project: the paper's two-branch network and local pretrained-weight loading.

Importing this package registers ``TwoBranchReID`` in fast-reid's ``META_ARCH_REGISTRY``, so
``MODEL.META_ARCHITECTURE: TwoBranchReID`` works with fast-reid's ``build_model``.
"""
from adaptive_l2.modeling.losses import soft_margin_batch_hard_triplet
from adaptive_l2.modeling.pretrained import check_pretrain_config, load_pretrained_backbone
from adaptive_l2.modeling.two_branch import TwoBranchReID, add_two_branch_config

__all__ = [
    "TwoBranchReID",
    "add_two_branch_config",
    "check_pretrain_config",
    "load_pretrained_backbone",
    "soft_margin_batch_hard_triplet",
]
