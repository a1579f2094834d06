"""The two-branch model of Ni et al., "Adaptive L2 Regularization in Person Re-Identification"
(ICPR 2020), as the fast-reid meta-architecture ``TwoBranchReID``.

A ResNet up to conv4 is shared; conv5 is duplicated (two copies with the same initial, possibly
pretrained, weights). The global branch average-pools its conv5 copy. The regional branch cuts its
conv5 map into horizontal stripes, each followed by its own 3x3 conv + ReLU and average pooling.
Each pooled vector is clipped to [0, 1] and trained with a soft-margin batch-hard triplet loss and
with label-smoothed cross entropy behind BatchNorm1d + a bias-free linear classifier. At test time
the clipped pooled vectors are concatenated (2048 + 2 * 1024 = 4096 dimensions for ResNet-50).

Top-level children are ``backbone`` (stem .. conv4), ``global_conv5``, ``regional_conv5`` and
``heads`` (stripe convs, BatchNorm1d necks, classifiers), so fast-reid's ``MODEL.FREEZE_LAYERS:
["backbone", "global_conv5", "regional_conv5"]`` freezes exactly the pretrained part (the paper's
first training phase) and ``SOLVER.HEADS_LR_FACTOR`` applies to the new layers only.

The original is Keras, whose ResNet v1 convolutions have biases: about 265 regularized tensors for
ResNet-50. torchvision / fast-reid ResNets have bias-free convolutions followed by BatchNorm, so
this model has fewer trainable tensors (the adaptive L2 penalty gets one factor per tensor).
"""
from __future__ import annotations

import copy
from typing import Dict, List, Sequence, Union

import torch
import torch.nn.functional as F
from fastreid.config import CfgNode, configurable
from fastreid.modeling.backbones import build_backbone
from fastreid.modeling.backbones.resnet import Bottleneck, ResNet
from fastreid.modeling.meta_arch import META_ARCH_REGISTRY
from torch import nn

from adaptive_l2.modeling.backbone_options import check_pixel_format, normalize_pixels
from adaptive_l2.modeling.losses import soft_margin_batch_hard_triplet
from adaptive_l2.modeling.pretrained import check_pretrain_config, load_pretrained_backbone

GLOBAL_BRANCH = "global"

# Depths fast-reid's `build_resnet_backbone` lacks: blocks per stage of torchvision's ResNet-152.
_EXTRA_RESNET_DEPTHS = {"152x": [3, 8, 36, 3]}


def add_two_branch_config(cfg: CfgNode) -> CfgNode:
    """Add the ``MODEL.TWO_BRANCH`` keys (paper's values) to a fast-reid config; returns it."""
    cfg.MODEL.TWO_BRANCH = CfgNode()
    cfg.MODEL.TWO_BRANCH.STRIPES = 2  # horizontal stripes of the regional branch (top / bottom)
    cfg.MODEL.TWO_BRANCH.REGIONAL_DIM = 1024  # output channels of each stripe's 3x3 conv
    cfg.MODEL.TWO_BRANCH.BN_EPS = 2e-5  # epsilon of the BatchNorm1d before each classifier
    cfg.MODEL.TWO_BRANCH.BN_MOMENTUM = 0.01  # its running-stat momentum (Keras momentum 0.99)
    cfg.MODEL.TWO_BRANCH.CLS_INIT_STD = 0.001  # std of the normal init of the classifier weights
    cfg.MODEL.TWO_BRANCH.LABEL_SMOOTHING = 0.1  # label smoothing of each cross-entropy loss
    cfg.MODEL.TWO_BRANCH.CLIP_MIN = 0.0  # pooled features are clipped to [CLIP_MIN, CLIP_MAX]
    cfg.MODEL.TWO_BRANCH.CLIP_MAX = 1.0  # before both losses and in the test feature
    return cfg


def branch_names(stripes: int) -> List[str]:
    """Names of the pooled features, in output order: global, stripe1, stripe2, ..."""
    return [GLOBAL_BRANCH] + [f"stripe{index + 1}" for index in range(stripes)]


class ResNetTrunk(nn.Module):
    """A fast-reid ResNet's stem and conv2..conv4 (``layer1..layer3``), under the same names."""

    def __init__(self, resnet: ResNet) -> None:
        super().__init__()
        self.conv1 = resnet.conv1
        self.bn1 = resnet.bn1
        self.relu = resnet.relu
        self.maxpool = resnet.maxpool
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        return self.layer3(self.layer2(self.layer1(x)))


class TwoBranchHeads(nn.Module):
    """Everything the paper adds to the ResNet: stripe convs, BatchNorm1d necks, classifiers."""

    def __init__(
        self,
        *,
        conv5_channels: int,
        stripes: int,
        regional_dim: int,
        num_classes: int,
        bn_eps: float,
        bn_momentum: float,
        cls_init_std: float,
    ) -> None:
        super().__init__()
        self.stripe_convs = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(conv5_channels, regional_dim, kernel_size=3, padding=1, bias=True),
                nn.ReLU(inplace=True),
            )
            for _ in range(stripes)
        )
        dims = [conv5_channels] + [regional_dim] * stripes
        self.bottlenecks = nn.ModuleList(
            nn.BatchNorm1d(dim, eps=bn_eps, momentum=bn_momentum) for dim in dims
        )
        self.classifiers = nn.ModuleList(nn.Linear(dim, num_classes, bias=False) for dim in dims)
        for block in self.stripe_convs:
            # Keras' Conv2D defaults, as in the original code.
            nn.init.xavier_uniform_(block[0].weight)
            nn.init.zeros_(block[0].bias)
        for classifier in self.classifiers:
            nn.init.normal_(classifier.weight, mean=0.0, std=cls_init_std)

    def logits(self, features: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Class scores of each (clipped) pooled feature."""
        return [
            classifier(bottleneck(feature))
            for feature, bottleneck, classifier in zip(features, self.bottlenecks, self.classifiers)
        ]


def _resnet_out_channels(layer: nn.Sequential) -> int:
    """Channels a ResNet stage outputs: those of the last convolution of its last block."""
    convs = [module for module in layer[-1].modules() if isinstance(module, nn.Conv2d)]
    if not convs:
        raise ValueError("cannot infer conv5's output channels: its last block has no Conv2d")
    return convs[-1].out_channels


def build_resnet(cfg: CfgNode) -> ResNet:
    """Build fast-reid's ResNet from ``MODEL.BACKBONE`` without pretrained weights (no download).

    Adds depth "152x", which fast-reid's `build_resnet_backbone` lacks.
    """
    backbone_cfg = cfg.MODEL.BACKBONE
    if backbone_cfg.NAME != "build_resnet_backbone":
        raise ValueError(
            f"TwoBranchReID needs MODEL.BACKBONE.NAME 'build_resnet_backbone' (it splits conv5 off "
            f"a ResNet), got '{backbone_cfg.NAME}'."
        )
    if backbone_cfg.WITH_NL:
        raise ValueError(
            "TwoBranchReID does not support MODEL.BACKBONE.WITH_NL True (non-local blocks are not "
            "part of the paper's model); set it False."
        )
    if backbone_cfg.DEPTH in _EXTRA_RESNET_DEPTHS:
        blocks = _EXTRA_RESNET_DEPTHS[backbone_cfg.DEPTH]
        return ResNet(
            backbone_cfg.LAST_STRIDE, backbone_cfg.NORM, backbone_cfg.WITH_IBN,
            backbone_cfg.WITH_SE, False, Bottleneck, blocks, [0, 0, 0, 0],
        )
    supported = ("18x", "34x", "50x", "101x", *_EXTRA_RESNET_DEPTHS)
    if backbone_cfg.DEPTH not in supported:
        raise ValueError(
            f"MODEL.BACKBONE.DEPTH '{backbone_cfg.DEPTH}' is not supported; use one of {supported}."
        )
    random_cfg = cfg.clone()
    random_cfg.defrost()
    random_cfg.MODEL.BACKBONE.PRETRAIN = False
    return build_backbone(random_cfg)


@META_ARCH_REGISTRY.register()
class TwoBranchReID(nn.Module):
    """Global + regional (stripe) branches on a shared ResNet, with the paper's six losses.

    Same interface as fast-reid's ``Baseline``: ``forward({"images": (B, 3, H, W) 0-255,
    "targets": (B,)})`` returns a dict of ``loss_*`` tensors in training mode and the
    (B, C5 + STRIPES * REGIONAL_DIM) test features in eval mode.
    """

    # the pretrained ResNet, whose BatchNorm / stride options apply (see backbone_options)
    backbone_parts = ("backbone", "global_conv5", "regional_conv5")

    @configurable
    def __init__(
        self,
        *,
        backbone: ResNetTrunk,
        conv5: nn.Module,
        heads: TwoBranchHeads,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        clip_min: float = 0.0,
        clip_max: float = 1.0,
        label_smoothing: float = 0.1,
        pixel_format: str = "RGB",
    ) -> None:
        """Build from parts; ``conv5`` is duplicated here, so both copies start equal."""
        super().__init__()
        self.backbone = backbone
        self.global_conv5 = conv5
        self.regional_conv5 = copy.deepcopy(conv5)
        self.heads = heads
        self.clip_min = clip_min
        self.clip_max = clip_max
        self.label_smoothing = label_smoothing
        self.pixel_format = check_pixel_format(pixel_format)
        self.branch_names = branch_names(len(heads.stripe_convs))
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, -1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, -1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg: CfgNode) -> Dict[str, object]:
        if "TWO_BRANCH" not in cfg.MODEL:
            raise KeyError(
                "MODEL.TWO_BRANCH is missing from the config: call "
                "adaptive_l2.modeling.add_two_branch_config(cfg) before merging a YAML file."
            )
        check_pretrain_config(cfg)
        options = cfg.MODEL.TWO_BRANCH
        num_classes = cfg.MODEL.HEADS.NUM_CLASSES
        if num_classes < 0:
            raise ValueError(
                f"MODEL.HEADS.NUM_CLASSES must be >= 0 for TwoBranchReID, got {num_classes}; "
                "fast-reid's trainer sets it from the training set (0 builds a model for "
                "evaluation only, its classifiers empty)."
            )
        if options.STRIPES < 1:
            raise ValueError(f"MODEL.TWO_BRANCH.STRIPES must be >= 1, got {options.STRIPES}")
        if not options.CLIP_MIN < options.CLIP_MAX:
            raise ValueError(
                f"MODEL.TWO_BRANCH.CLIP_MIN ({options.CLIP_MIN}) must be below CLIP_MAX "
                f"({options.CLIP_MAX})."
            )
        resnet = build_resnet(cfg)
        if cfg.MODEL.BACKBONE.PRETRAIN:
            load_pretrained_backbone(resnet, cfg.MODEL.BACKBONE.PRETRAIN_PATH)
        heads = TwoBranchHeads(
            conv5_channels=_resnet_out_channels(resnet.layer4),
            stripes=options.STRIPES,
            regional_dim=options.REGIONAL_DIM,
            num_classes=num_classes,
            bn_eps=options.BN_EPS,
            bn_momentum=options.BN_MOMENTUM,
            cls_init_std=options.CLS_INIT_STD,
        )
        return {
            "backbone": ResNetTrunk(resnet),
            "conv5": resnet.layer4,
            "heads": heads,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "clip_min": options.CLIP_MIN,
            "clip_max": options.CLIP_MAX,
            "label_smoothing": options.LABEL_SMOOTHING,
            "pixel_format": cfg.MODEL.get("PIXEL_FORMAT", "RGB"),
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess_image(
        self, batched_inputs: Union[Dict[str, torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """Normalize 0-255 RGB images with MODEL.PIXEL_MEAN / PIXEL_STD (channels flipped first
        when MODEL.PIXEL_FORMAT is "BGR"), out of place (see `normalize_pixels`)."""
        return normalize_pixels(batched_inputs, self.pixel_mean, self.pixel_std, self.pixel_format)

    def pooled_features(self, images: torch.Tensor) -> List[torch.Tensor]:
        """Unclipped pooled vectors of normalized images: global, then one per stripe."""
        shared = self.backbone(images)
        global_map = self.global_conv5(shared)
        regional_map = self.regional_conv5(shared)
        stripes = len(self.heads.stripe_convs)
        if regional_map.shape[2] < stripes:
            raise ValueError(
                f"conv5 feature map height {regional_map.shape[2]} is below "
                f"MODEL.TWO_BRANCH.STRIPES = {stripes}; use taller inputs (INPUT.SIZE_TRAIN / "
                "SIZE_TEST) or fewer stripes."
            )
        pooled = [global_map.mean(dim=(2, 3))]
        stripe_maps = torch.tensor_split(regional_map, stripes, dim=2)
        for stripe_map, conv in zip(stripe_maps, self.heads.stripe_convs):
            pooled.append(conv(stripe_map).mean(dim=(2, 3)))
        return pooled

    def clipped_features(self, images: torch.Tensor) -> List[torch.Tensor]:
        """Pooled vectors clipped to [CLIP_MIN, CLIP_MAX]: the inputs of every loss."""
        pooled = self.pooled_features(images)
        return [feature.clamp(self.clip_min, self.clip_max) for feature in pooled]

    def forward(
        self, batched_inputs: Union[Dict[str, torch.Tensor], torch.Tensor]
    ) -> Union[Dict[str, torch.Tensor], torch.Tensor]:
        images = self.preprocess_image(batched_inputs)
        if not self.training:
            return torch.cat(self.clipped_features(images), dim=1)
        if not isinstance(batched_inputs, dict) or "targets" not in batched_inputs:
            raise ValueError(
                "TwoBranchReID in training mode needs a dict with 'targets' (person IDs); call "
                "model.eval() to extract features."
            )
        if self.heads.classifiers[0].out_features == 0:
            raise ValueError("TwoBranchReID was built with MODEL.HEADS.NUM_CLASSES 0: it can extract "
                             "features but not train; fast-reid's trainer sets the number")
        features = self.clipped_features(images)
        targets = batched_inputs["targets"].to(self.device)
        # fast-reid's PreciseBN hook sets every target to -1: the losses are discarded then, any
        # valid class index keeps them computable. On the device: an `if` would sync every step.
        targets = targets.masked_fill((targets < 0).any(), 0)
        return self.losses(features, targets)

    def losses(
        self, features: Sequence[torch.Tensor], targets: torch.Tensor
    ) -> Dict[str, torch.Tensor]:
        """The six losses (cross entropy and triplet per branch), each of weight 1."""
        loss_dict: Dict[str, torch.Tensor] = {}
        logits = self.heads.logits(features)
        for name, feature, scores in zip(self.branch_names, features, logits):
            loss_dict[f"loss_{name}_ce"] = F.cross_entropy(
                scores, targets, label_smoothing=self.label_smoothing
            )
            loss_dict[f"loss_{name}_triplet"] = soft_margin_batch_hard_triplet(feature, targets)
        return loss_dict
