"""Patches that make fast-reid 1.4.0 work on Python 3.11, torch 2.x and NumPy 2.

fast-reid's only PyPI release predates these versions. Every patch of the host lives here, each a
small function with the reason in its docstring, applied once by :func:`apply_all` when
``adaptive_l2`` is imported. ``APPLIED`` lists the patches that took effect in this process, so a
test or a user can see which were needed. No patch copies host code: each swaps one name for a
wrapper or a subclass.

The silent no-training bug (contiguous parameter buffers) is not patched here: it is avoided by
``adaptive_l2.optim.build_optimizer``, which the project's Trainer uses.
"""
from __future__ import annotations

import collections
import collections.abc
import contextlib
import logging
import sys
import types
import warnings
from typing import List, Optional

import torch

logger = logging.getLogger(__name__)

APPLIED: List[str] = []

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


def patch_torchvision_op_schemas() -> None:
    """Define torchvision's operator schemas when its C++ extension cannot load.

    PyPI has no CPU build of torchvision: its wheel for torch 2.13 is a CUDA build whose ops do not
    load against the CPU torch wheel, and `import torchvision` then dies in
    `_meta_registrations` with "operator torchvision::nms does not exist". fast-reid needs only
    torchvision's transforms, which never call these ops.
    """
    global _torchvision_schema_library
    if "torchvision" in sys.modules or _torchvision_extension_loads():
        return
    if hasattr(torch.ops.torchvision, "nms"):
        return
    _torchvision_schema_library = torch.library.Library("torchvision", "DEF")
    for schema in _TORCHVISION_OP_SCHEMAS:
        _torchvision_schema_library.define(schema)
    APPLIED.append("torchvision_op_schemas")


def patch_removed_std_names() -> None:
    """Restore two names fast-reid imports that no longer exist.

    `from torch._six import string_classes` (fastreid/data/build.py): torch._six was removed in
    torch 2.0. `from collections import Mapping` (fastreid/data/build.py,
    fastreid/evaluation/testing.py): removed in Python 3.10. Both are aliases of the current names.
    """
    if "torch._six" not in sys.modules:
        import importlib.util

        if importlib.util.find_spec("torch._six") is None:
            six = types.ModuleType("torch._six")
            six.string_classes = (str, bytes)
            six.__doc__ = "Shim created by adaptive_l2.compat for fast-reid 1.4.0."
            sys.modules["torch._six"] = six
            APPLIED.append("torch_six_shim")
    if not hasattr(collections, "Mapping"):
        collections.Mapping = collections.abc.Mapping
        APPLIED.append("collections_mapping_alias")


_batches_on_cuda: Optional[bool] = None  # set by `batches_on` while the project builds loaders


@contextlib.contextmanager
def batches_on(device: str):
    """Loaders built inside deliver their batches for `device` (a config's MODEL.DEVICE)."""
    global _batches_on_cuda
    previous = _batches_on_cuda
    _batches_on_cuda = str(device).startswith("cuda")
    try:
        yield
    finally:
        _batches_on_cuda = previous


def patch_dataloader_cuda_stream() -> None:
    """Make fast-reid's DataLoaderX usable without CUDA, and for CPU runs on a GPU machine.

    `fastreid.data.data_utils.DataLoaderX` creates a CUDA stream in its constructor, a background
    thread calling `torch.cuda.set_device`, and moves every batch to `cuda:local_rank`: building a
    loader crashes without CUDA, and a `MODEL.DEVICE cpu` run on a GPU machine gets CUDA batches.
    The host's loader is kept only for batches meant for a GPU (the device of the loader being
    built, see `batches_on`; CUDA availability otherwise); a plain DataLoader serves the rest.
    """
    from torch.utils.data import DataLoader

    import fastreid.data.build as data_build
    import fastreid.data.data_utils as data_utils

    host_loader = data_utils.DataLoaderX

    class DeviceAwareDataLoader(DataLoader):
        """`DataLoaderX` where CUDA exists, a plain DataLoader elsewhere."""

        def __new__(cls, local_rank: int, **kwargs):
            on_cuda = torch.cuda.is_available() if _batches_on_cuda is None else _batches_on_cuda
            if on_cuda and torch.cuda.is_available():
                return host_loader(local_rank, **kwargs)
            return DataLoader(**kwargs)

    data_build.DataLoaderX = DeviceAwareDataLoader
    APPLIED.append("dataloader_without_cuda")


def patch_jaccard_search_device() -> None:
    """Let k-reciprocal re-ranking run without a GPU.

    `fastreid.utils.compute_dist.build_dist(..., metric="jaccard")` hard-codes
    `search_option=0` (faiss GPU resources, `features.cuda()`), so `TEST.RERANK.ENABLED` crashes on
    a CPU machine or with the faiss CPU build. We route it to the project's re-ranking, which picks
    the faiss GPU path only when CUDA and faiss GPU are both present.
    """
    import fastreid.utils.compute_dist as compute_dist

    from adaptive_l2.evaluation.rerank import jaccard_distance

    host_build_dist = compute_dist.build_dist

    def build_dist(feat_1, feat_2, metric="euclidean", **kwargs):
        if metric != "jaccard":
            return host_build_dist(feat_1, feat_2, metric, **kwargs)
        feat = torch.cat((feat_1, feat_2), dim=0)
        return jaccard_distance(feat, k1=kwargs["k1"], k2=kwargs["k2"], num_query=feat_1.size(0))

    compute_dist.build_dist = build_dist
    import fastreid.evaluation.reid_evaluation as reid_evaluation

    reid_evaluation.build_dist = build_dist
    APPLIED.append("jaccard_on_cpu")


def patch_rank_evaluator_compile() -> None:
    """Never compile, and never `sys.exit`, inside an evaluation.

    fast-reid compiles its Cython rank evaluator at the first evaluation by running `make` in
    site-packages with whatever `python3` is first on PATH, and calls `sys.exit(1)` if that fails,
    after training has finished. The project builds the extension at install time (`make
    install`); if it is missing anyway, evaluation warns once and uses fast-reid's pure-Python
    evaluator, which gives the same numbers, more slowly.
    """
    import fastreid.evaluation.reid_evaluation as reid_evaluation

    def rank_evaluator_is_compiled() -> bool:
        try:
            from fastreid.evaluation.rank_cylib.rank_cy import evaluate_cy  # noqa: F401
        except ImportError:
            return False
        return True

    def compile_dependencies(self) -> None:
        if not rank_evaluator_is_compiled() and not getattr(compile_dependencies, "warned", False):
            warnings.warn(
                "fast-reid's Cython rank evaluator is not built; evaluating with the slower Python "
                "evaluator. Build it with `make install` (see README).",
                RuntimeWarning,
            )
            compile_dependencies.warned = True

    def refuse_runtime_compile() -> None:
        raise RuntimeError(
            "adaptive_l2 does not compile fast-reid's rank evaluator during a run; "
            "build it at install time with `make install`."
        )

    reid_evaluation.ReidEvaluator._compile_dependencies = compile_dependencies
    reid_evaluation.compile_helper = refuse_runtime_compile
    APPLIED.append("rank_evaluator_no_runtime_compile")


class CorruptImageError(OSError):
    """An image file of a dataset cannot be decoded."""


def patch_read_image_errors() -> None:
    """Name the file when an image cannot be decoded.

    fast-reid's `read_image` lets PIL's error escape from inside a data-loader worker, where the
    message names a file object, not the dataset file to fix.
    """
    import fastreid.data.common as data_common
    import fastreid.data.data_utils as data_utils

    host_read_image = data_utils.read_image

    def read_image(file_name, format=None):
        try:
            image = host_read_image(file_name, format)
            image.load()
        except FileNotFoundError as error:
            raise FileNotFoundError(f"image file missing: {file_name}") from error
        except (OSError, ValueError, SyntaxError) as error:
            raise CorruptImageError(
                f"cannot decode image file {file_name!r} ({error}); replace or remove it"
            ) from error
        return image

    data_utils.read_image = read_image
    data_common.read_image = read_image
    APPLIED.append("read_image_names_file")


def patch_inplace_normalization() -> None:
    """Normalize input images out of place in fast-reid's Baseline and MGN.

    Their `preprocess_image` runs `images.sub_(mean).div_(std)` on the caller's batch. The
    evaluator's flip test (TEST.FLIP.ENABLED) then flips the already normalized images and the
    model normalizes them a second time, so flip-averaged features are wrong; an adversarial attack
    or a second forward pass over the same batch meets the same trap.
    """
    from fastreid.modeling.meta_arch.baseline import Baseline
    from fastreid.modeling.meta_arch.mgn import MGN

    def preprocess_image(self, batched_inputs):
        if isinstance(batched_inputs, dict):
            images = batched_inputs["images"]
        elif isinstance(batched_inputs, torch.Tensor):
            images = batched_inputs
        else:
            raise TypeError(f"batched_inputs must be a dict or a tensor, got {type(batched_inputs)}")
        return (images.to(self.device) - self.pixel_mean) / self.pixel_std

    Baseline.preprocess_image = preprocess_image
    MGN.preprocess_image = preprocess_image
    APPLIED.append("out_of_place_normalization")


def patch_metric_printer_same_iteration() -> None:
    """Let fast-reid's console writer run twice at one iteration.

    `CommonMetricPrinter.write` estimates the ETA from the iterations since its last write until
    the iteration timer has samples (its first 3 iterations are warm-up). `PeriodicWriter` writes
    after a step and again after the epoch: when an epoch ends on a write period within the first
    iterations, the estimate divides by zero and training dies with ZeroDivisionError.
    """
    from fastreid.utils.events import CommonMetricPrinter, get_event_storage

    host_write = CommonMetricPrinter.write

    def write(self):
        last = getattr(self, "_last_write", None)
        if last is not None and last[0] == get_event_storage().iter:
            self._last_write = None  # nothing elapsed since: no estimate, no division by zero
        return host_write(self)

    CommonMetricPrinter.write = write
    APPLIED.append("metric_printer_same_iteration")


def patch_default_trainer_refuses_l2_terms() -> None:
    """Make fast-reid's stock `DefaultTrainer` refuse a config that asks for an L2 term.

    The term is attached by `adaptive_l2.Trainer.build_model`; the stock trainer builds the bare
    model, so with MODEL.REG.ADAPTIVE / CONVENTIONAL.ENABLED True it trains without any term, and
    says nothing (its contiguous optimizer does not train on torch 2 either, see
    `adaptive_l2.optim`). Its `build_model` now raises, naming the key and the trainer to use.
    """
    from fastreid.engine.defaults import DefaultTrainer

    host_build_model = DefaultTrainer.__dict__["build_model"].__func__

    def build_model(cls, cfg):
        from adaptive_l2.trainer import Trainer

        reg = getattr(cfg.MODEL, "REG", None)
        asked = reg is not None and (reg.ADAPTIVE or reg.CONVENTIONAL.ENABLED)
        if asked and not issubclass(cls, Trainer):
            key = "MODEL.REG.ADAPTIVE" if reg.ADAPTIVE else "MODEL.REG.CONVENTIONAL.ENABLED"
            raise ValueError(
                f"{key} is True but {cls.__name__} is fast-reid's DefaultTrainer, which builds the "
                "model without the L2 term (it would train silently without it): train with "
                "adaptive_l2.Trainer (tools/train_net.py), or set the key to False.")
        return host_build_model(cls, cfg)

    DefaultTrainer.build_model = classmethod(build_model)
    APPLIED.append("default_trainer_refuses_l2_terms")


_done = False


def apply_all() -> None:
    """Apply every patch once; the order matters (torchvision before fast-reid imports it)."""
    global _done
    if _done:
        return
    patch_torchvision_op_schemas()
    patch_removed_std_names()
    warnings.filterwarnings("ignore", message=".*Cython rank evaluation.*")
    patch_dataloader_cuda_stream()
    patch_rank_evaluator_compile()
    patch_read_image_errors()
    patch_inplace_normalization()
    patch_metric_printer_same_iteration()
    patch_jaccard_search_device()
    patch_default_trainer_refuses_l2_terms()
    _done = True
