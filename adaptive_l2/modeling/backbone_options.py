"""Backbone options that make fast-reid's ResNet behave as the original's Keras ResNet v1.

Each is a config key whose default keeps fast-reid's behaviour (configs/Paper set the Keras values):

- ``MODEL.BACKBONE.NORM_MOMENTUM`` / ``NORM_EPS``: Keras's BatchNorm has momentum 0.99 (torch
  momentum 0.01) and eps 1.001e-5, fast-reid's 0.1 and 1e-5. Applied to every BatchNorm of the
  backbone (for TwoBranchReID: the trunk and both conv5 copies), never to the heads' BNs.
- ``MODEL.BACKBONE.STRIDE_IN_1X1``: Keras's ResNet v1 strides the first 1x1 convolution of a
  bottleneck, torchvision / fast-reid (v1.5) the 3x3. Weights keep their shapes, so weight files of
  either layout load; output shapes are unchanged.
- ``MODEL.PIXEL_FORMAT``: "BGR" flips the channels of the 0-255 RGB images before PIXEL_MEAN /
  PIXEL_STD apply, the caffe preprocessing that Keras-converted ImageNet weights expect (with
  PIXEL_MEAN [103.939, 116.779, 123.68] and PIXEL_STD [1, 1, 1]).
"""
from __future__ import annotations

import logging
from typing import Dict, List, Sequence, Union

import torch
from fastreid.config import CfgNode
from fastreid.modeling.backbones.resnet import Bottleneck
from fastreid.modeling.meta_arch.baseline import Baseline
from fastreid.modeling.meta_arch.mgn import MGN
from torch import nn

logger = logging.getLogger(__name__)

PIXEL_FORMATS = ("RGB", "BGR")
# Children of a model that hold its (pretrained) backbone, unless the model class says otherwise
# with a `backbone_parts` attribute (TwoBranchReID: the trunk and its two conv5 copies).
DEFAULT_BACKBONE_PARTS = ("backbone",)


def check_pixel_format(pixel_format: str) -> str:
    """Return MODEL.PIXEL_FORMAT if it is "RGB" or "BGR"; raise naming the key otherwise."""
    if pixel_format not in PIXEL_FORMATS:
        raise ValueError(f"MODEL.PIXEL_FORMAT must be one of {PIXEL_FORMATS}, got '{pixel_format}'")
    return pixel_format


def normalize_pixels(
    batched_inputs: Union[Dict[str, torch.Tensor], torch.Tensor],
    pixel_mean: torch.Tensor,
    pixel_std: torch.Tensor,
    pixel_format: str = "RGB",
) -> torch.Tensor:
    """(images - mean) / std of 0-255 RGB images (B, 3, H, W), channels flipped first for "BGR".

    Out of place: the evaluator flips the caller's ``images`` after the first forward pass, which
    must still hold the raw images then. Images move to the device of ``pixel_mean``.
    """
    if isinstance(batched_inputs, dict):
        images = batched_inputs["images"]
    elif isinstance(batched_inputs, torch.Tensor):
        images = batched_inputs
    else:
        raise TypeError(
            f"expected a dict with 'images' or a tensor, got {type(batched_inputs).__name__}"
        )
    images = images.to(pixel_mean.device)
    if check_pixel_format(pixel_format) == "BGR":
        images = images.flip(1)
    return (images - pixel_mean) / pixel_std


def backbone_modules(model: nn.Module) -> List[nn.Module]:
    """The model's backbone children (names from its `backbone_parts`, default "backbone")."""
    modules = []
    for name in getattr(model, "backbone_parts", DEFAULT_BACKBONE_PARTS):
        part = getattr(model, name, None)
        if not isinstance(part, nn.Module):
            raise ValueError(
                f"{type(model).__name__} has no backbone module '{name}': the MODEL.BACKBONE "
                "options NORM_MOMENTUM / NORM_EPS / STRIDE_IN_1X1 cannot be applied"
            )
        modules.append(part)
    return modules


def set_batchnorm_options(modules: Sequence[nn.Module], momentum: float, eps: float) -> int:
    """Set momentum / eps (a negative value keeps the layer's own) of every BatchNorm inside
    ``modules``; returns how many layers there are."""
    layers = [layer for module in modules for layer in module.modules()
              if isinstance(layer, nn.modules.batchnorm._BatchNorm)]
    for layer in layers:
        if momentum >= 0:
            layer.momentum = momentum
        if eps >= 0:
            layer.eps = eps
    return len(layers)


def move_stride_to_1x1(modules: Sequence[nn.Module]) -> int:
    """Move the stride of every strided ResNet bottleneck from its 3x3 to its first 1x1 conv
    (ResNet v1); the downsample branch keeps its own. Returns the number of blocks changed."""
    moved = 0
    for module in modules:
        for block in module.modules():
            if isinstance(block, Bottleneck) and block.conv2.stride != (1, 1):
                block.conv1.stride = block.conv2.stride
                block.conv2.stride = (1, 1)
                moved += 1
    return moved


def _check_backbone_options(options: CfgNode) -> None:
    if options.NORM_MOMENTUM > 1:
        raise ValueError(
            f"MODEL.BACKBONE.NORM_MOMENTUM is torch's BN momentum, in [0, 1] (Keras 0.99 is torch "
            f"0.01), or negative to keep the host's; got {options.NORM_MOMENTUM}"
        )
    if options.NORM_EPS == 0:
        raise ValueError("MODEL.BACKBONE.NORM_EPS must be > 0, or negative to keep the host's")


def apply_backbone_options(model: nn.Module, cfg: CfgNode) -> nn.Module:
    """Apply MODEL.BACKBONE.NORM_MOMENTUM / NORM_EPS / STRIDE_IN_1X1 and MODEL.PIXEL_FORMAT to a
    freshly built model, in place (it is the caller's new model); returns it.

    Runs after the model is built, so TwoBranchReID's conv5 copies get the options too.
    """
    options = cfg.MODEL.BACKBONE
    _check_backbone_options(options)
    pixel_format = check_pixel_format(cfg.MODEL.PIXEL_FORMAT)
    parts = backbone_modules(model)
    if options.NORM_MOMENTUM >= 0 or options.NORM_EPS >= 0:
        count = set_batchnorm_options(parts, options.NORM_MOMENTUM, options.NORM_EPS)
        logger.info("Backbone BatchNorm: momentum %s, eps %s on %d layers",
                    options.NORM_MOMENTUM, options.NORM_EPS, count)
    if options.STRIDE_IN_1X1:
        moved = move_stride_to_1x1(parts)
        if moved == 0:
            raise ValueError(
                "MODEL.BACKBONE.STRIDE_IN_1X1 True needs a bottleneck ResNet backbone (depth 50x "
                f"or more), but {type(model).__name__}'s backbone has no strided bottleneck"
            )
        logger.info("ResNet v1 strides: moved to the 1x1 conv in %d bottlenecks", moved)
    set_pixel_format(model, pixel_format)
    return model


def set_pixel_format(model: nn.Module, pixel_format: str) -> None:
    """Tell a model whose preprocessing calls `normalize_pixels` (fast-reid's Baseline and MGN
    through adaptive_l2.compat, TwoBranchReID) which channel order its weights expect."""
    reads_format = hasattr(model, "pixel_format") or isinstance(model, (Baseline, MGN))
    if reads_format:
        model.pixel_format = check_pixel_format(pixel_format)
    elif pixel_format != "RGB":
        raise ValueError(f"MODEL.PIXEL_FORMAT '{pixel_format}' is not supported by "
                         f"{type(model).__name__}: only Baseline, MGN and TwoBranchReID read it")
