"""Patches that let fast-reid 1.4.0 and torchvision import on Python 3.11 / torch 2.

This module imports nothing of the project (only the standard library and torch), so a test can
load it alone and show what breaks without the other patches.
"""
from __future__ import annotations

import collections
import collections.abc
import sys
import types
from typing import List

import torch


# Operator schemas of torchvision's C++ extension (torchvision/csrc/ops). Only needed to let
# `import torchvision` succeed when that extension cannot load; no kernel is registered, so calling
# one of these ops (fast-reid never does) raises "no kernel" instead of failing at import.
_TORCHVISION_OP_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor",
    "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "qroi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor",
    "ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, int sampling_ratio) -> (Tensor, Tensor)",
    "_ps_roi_align_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, SymInt batch_size, "
    "SymInt channels, SymInt height, SymInt width) -> Tensor",
    "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width) -> (Tensor, Tensor)",
    "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, "
    "SymInt height, SymInt width) -> Tensor",
    "ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width) -> (Tensor, Tensor)",
    "_ps_roi_pool_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, "
    "SymInt height, SymInt width) -> Tensor",
    "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, "
    "SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, "
    "SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask) -> Tensor",
    "_deform_conv2d_backward(Tensor grad, Tensor input, Tensor weight, Tensor offset, Tensor mask, "
    "Tensor bias, SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, "
    "SymInt dilation_h, SymInt dilation_w, SymInt groups, SymInt offset_groups, "
    "bool use_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)


_torchvision_schema_library = None  # kept alive: dropping the Library object deletes the schemas


def _torchvision_extension_loads() -> bool:
    import importlib.util

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # torchvision absent: nothing to patch, the import error will say so
    import glob
    import os

    libs = glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so"))
    if not libs:
        return False
    try:
        torch.ops.load_library(libs[0])
    except OSError:
        return False
    return True


def patch_torchvision_op_schemas() -> List[str]:
    """Define torchvision's operator schemas when its C++ extension cannot load.

    PyPI has no CPU build of torchvision: its wheel for torch 2.13 is a CUDA build whose ops do not
    load against the CPU torch wheel, and `import torchvision` then dies in
    `_meta_registrations` with "operator torchvision::nms does not exist". fast-reid needs only
    torchvision's transforms, which never call these ops.
    """
    global _torchvision_schema_library
    if "torchvision" in sys.modules or _torchvision_extension_loads():
        return []
    if hasattr(torch.ops.torchvision, "nms"):
        return []
    _torchvision_schema_library = torch.library.Library("torchvision", "DEF")
    for schema in _TORCHVISION_OP_SCHEMAS:
        _torchvision_schema_library.define(schema)
    return ["torchvision_op_schemas"]


def patch_removed_std_names() -> List[str]:
    """Restore two names fast-reid imports that no longer exist.

    `from torch._six import string_classes` (fastreid/data/build.py): torch._six was removed in
    torch 2.0. `from collections import Mapping` (fastreid/data/build.py,
    fastreid/evaluation/testing.py): removed in Python 3.10. Both are aliases of the current names.
    """
    applied = []
    if "torch._six" not in sys.modules:
        import importlib.util

        if importlib.util.find_spec("torch._six") is None:
            six = types.ModuleType("torch._six")
            six.string_classes = (str, bytes)
            six.__doc__ = "Shim created by adaptive_l2.compat.imports for fast-reid 1.4.0."
            sys.modules["torch._six"] = six
            applied.append("torch_six_shim")
    if not hasattr(collections, "Mapping"):
        collections.Mapping = collections.abc.Mapping
        applied.append("collections_mapping_alias")
    return applied
