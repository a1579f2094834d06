"""Patches that make fast-reid 1.4.0 work on Python 3.11, torch 2.x and NumPy 2.

fast-reid's only PyPI release predates these versions. Every patch of the host lives here, each a
small function with the reason in its docstring, applied once by :func:`apply_all` when
``adaptive_l2`` is imported. ``APPLIED`` lists the patches that took effect in this process, so a
test or a user can see which were needed. No patch copies host code: each swaps one name for a
wrapper or a subclass.

Host code the project replaces rather than patches (through the plug-in idiom: a builder the
Trainer overrides, a subclass, a wrapper), each module with its reason in its docstring:

============================  ===================================================================
where                         what of fast-reid it replaces, and why
============================  ===================================================================
``adaptive_l2.optim``         ``build_optimizer``: contiguous parameter buffers never update on
                              torch 2 (the silent no-training bug); per-tensor groups instead
``adaptive_l2.trainer``       ``SimpleTrainer.run_step`` (``TrainStep``: torch.amp on any device,
                              no per-step host sync), DDP arguments on CPUs, AMP on CPUs
``adaptive_l2.distributed``   ``launch``: asserts CUDA/NCCL and has no torchrun path; gloo spawn
                              and env:// join instead (uses ``comm._LOCAL_PROCESS_GROUP``)
``adaptive_l2.checkpoint``    ``Checkpointer``: torn files on a kill, best model lost on resume;
                              subclass with atomic writes
``adaptive_l2.data.build``    ``build_reid_train_loader`` / test loader: global batches split by
                              process, per-sample augmentation seeds, the config's device
``adaptive_l2.hooks``         ``LayerFreeze``: its switch does not survive a resume; subclass
============================  ===================================================================
"""
from __future__ import annotations

import collections
import collections.abc
import contextlib
import contextvars
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


_batches_on: Optional[torch.device] = None  # set by `batches_on` while the project builds loaders


@contextlib.contextmanager
def batches_on(device: str):
    """Loaders built inside deliver their batches to `device` (a config's MODEL.DEVICE):
    `cuda:N` to GPU N, `cuda` to the process's GPU (`cuda:local_rank`), anything else stays on
    the CPU for the model to move."""
    global _batches_on
    previous = _batches_on
    _batches_on = torch.device(device)
    try:
        yield
    finally:
        _batches_on = previous


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

    class DeviceAwareDataLoader(DataLoader):
        """`DataLoaderX` where CUDA exists, a plain DataLoader elsewhere."""

        def __new__(cls, local_rank: int, **kwargs):
            on_cuda = torch.cuda.is_available() if _batches_on is None else \
                _batches_on.type == "cuda"
            if on_cuda and torch.cuda.is_available():
                # the host sends batches to cuda:local_rank; MODEL.DEVICE cuda:N means GPU N
                index = _batches_on.index if _batches_on is not None else None
                return data_utils.DataLoaderX(local_rank if index is None else index, **kwargs)
            return DataLoader(**kwargs)

    data_build.DataLoaderX = DeviceAwareDataLoader
    APPLIED.append("dataloader_without_cuda")


def patch_jaccard_search_device() -> None:
    """Let k-reciprocal re-ranking run without a GPU.

    `fastreid.utils.compute_dist.build_dist(..., metric="jaccard")` hard-codes
    `search_option=0` (faiss GPU resources, `features.cuda()`), so `TEST.RERANK.ENABLED` crashes on
    a CPU machine or with the faiss CPU build, and that path fills two dense N x N matrices (35 GB
    each at MSMT17 size). We route it to the project's sparse re-ranking: faiss CPU search for CPU
    features, a blocked torch pass on the device of others.
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


# The re-ranked distance `ReidEvaluator.evaluate` is computing, while it runs (see below).
_EVALUATOR_RERANK: contextvars.ContextVar = contextvars.ContextVar("evaluator_rerank",
                                                                   default=None)


def patch_evaluator_rerank() -> None:
    """Re-rank in fast-reid's evaluator in the configured variant, on the features' device.

    fast-reid's `ReidEvaluator.process` copies every feature batch to the CPU, so re-ranking never
    saw CUDA features (a faiss GPU build changed nothing), and `evaluate` always combines
    fast-reid's variant. With TEST.RERANK.ENABLED, `process` keeps the features on their device
    (one process without AQE: AQE's host code needs CPU tensors, and several processes gather
    pickled CPU tensors) and `evaluate` re-ranks on the device the features came from. The host's
    `evaluate` then runs on a copy of the config with re-ranking off, while its one `build_dist`
    call returns the re-ranked distance of TEST.RERANK.VARIANT; the caller's config is untouched.
    """
    import fastreid.evaluation.reid_evaluation as reid_evaluation
    from fastreid.utils import comm

    from adaptive_l2.evaluation.rerank import evaluator_rerank_distance

    evaluator = reid_evaluation.ReidEvaluator
    host_process, host_evaluate = evaluator.process, evaluator.evaluate
    metric_distance = reid_evaluation.build_dist

    def process(self, inputs, outputs):
        self._feature_device = outputs.device
        rerank = self.cfg.TEST.RERANK.ENABLED
        if not (rerank and not self.cfg.TEST.AQE.ENABLED and comm.get_world_size() == 1):
            return host_process(self, inputs, outputs)
        host_process(self, inputs, torch.empty(0))  # ids to the CPU, as the host does
        self._predictions[-1]["feats"] = outputs.to(torch.float32)

    def evaluate(self):
        settings = self.cfg.TEST.RERANK
        if not settings.ENABLED:
            return host_evaluate(self)
        device = getattr(self, "_feature_device", torch.device("cpu"))

        def reranked(query, gallery, metric):
            return evaluator_rerank_distance(
                query.to(device), gallery.to(device), metric, metric_distance,
                variant=settings.get("VARIANT", "fastreid"), k1=settings.K1, k2=settings.K2,
                lambda_value=settings.LAMBDA,
            )

        host_cfg = self.cfg
        self.cfg = host_cfg.clone()
        self.cfg.defrost()
        self.cfg.TEST.RERANK.ENABLED = False
        token = _EVALUATOR_RERANK.set(reranked)
        try:
            return host_evaluate(self)
        finally:
            _EVALUATOR_RERANK.reset(token)
            self.cfg = host_cfg

    def build_dist(feat_1, feat_2, metric="euclidean", **kwargs):
        reranked = _EVALUATOR_RERANK.get()
        if reranked is None or metric == "jaccard":
            return metric_distance(feat_1, feat_2, metric, **kwargs)
        return reranked(feat_1, feat_2, metric)

    evaluator.process, evaluator.evaluate = process, evaluate
    reid_evaluation.build_dist = build_dist
    APPLIED.append("evaluator_rerank_on_feature_device")


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


def patch_baseline_targets_without_sync() -> None:
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
    APPLIED.append("baseline_targets_without_sync")


# More deferred records than this are turned into floats at the next put: bounds the memory held
# when nothing reads the storage for a long time.
_MAX_DEFERRED_RECORDS = 4096


class _DeferredScalars:
    """Values put as a tensor at one iteration, and how to put them as floats later."""

    __slots__ = ("values", "write", "iteration", "prefix")

    def __init__(self, values, write, iteration: int, prefix: str) -> None:
        self.values = values
        self.write = write
        self.iteration = iteration
        self.prefix = prefix


def put_deferred_scalars(storage, values: torch.Tensor, write) -> None:
    """Keep ``values`` (a tensor, on any device) until ``storage`` is read, then call
    ``write(list_of_floats)`` at the iteration and name scope of this call.

    ``write`` puts the floats with ``storage.put_scalar`` as it would have done at once; nothing
    waits for the device now. Needs :func:`patch_deferred_tensor_scalars`.
    """
    records = storage.__dict__.setdefault("_deferred_scalars", [])
    records.append(_DeferredScalars(values.detach().reshape(-1), write, storage.iter,
                                    storage._current_prefix))
    if len(records) > _MAX_DEFERRED_RECORDS:
        resolve_deferred_scalars(storage)


def resolve_deferred_scalars(storage) -> None:
    """Put every deferred record as floats, in the order they were put (one transfer per device)."""
    records = storage.__dict__.get("_deferred_scalars")
    if not records:
        return
    storage._deferred_scalars = []
    floats = {}
    devices = {}
    for record in records:
        devices.setdefault(record.values.device, []).append(record)
    for group in devices.values():
        flat = torch.cat([r.values.to(torch.float64) for r in group]).tolist()
        start = 0
        for record in group:
            floats[id(record)] = flat[start:start + record.values.numel()]
            start += record.values.numel()
    iteration, prefix = storage.iter, storage._current_prefix
    try:
        for record in records:
            storage.iter, storage._current_prefix = record.iteration, record.prefix
            record.write(floats[id(record)])
    finally:
        storage.iter, storage._current_prefix = iteration, prefix


def patch_deferred_tensor_scalars() -> None:
    """Let fast-reid's EventStorage take tensors without waiting for the device.

    `EventStorage.put_scalar` calls `float(value)`: fast-reid's `log_accuracy` puts a tensor at
    every step, which stalls the GPU until the step's kernels have run. A tensor value is now
    kept with its iteration and name scope, and all kept values become floats together when the
    storage is next read (`history`, `histories`, `latest`, `latest_with_smoothing_hint`,
    `smoothing_hints`: what the writers and hooks call at their period). Histories, latest values
    and smoothing hints are the same as with immediate puts; a name must not be put both as a
    tensor and as a float.
    """
    from fastreid.utils.events import EventStorage

    host_put_scalar = EventStorage.put_scalar

    def put_scalar(self, name, value, smoothing_hint=True):
        if not isinstance(value, torch.Tensor):
            return host_put_scalar(self, name, value, smoothing_hint)
        if value.numel() != 1:
            raise ValueError(f"EventStorage.put_scalar('{name}'): a tensor value must have one "
                             f"element, got shape {tuple(value.shape)}")
        put_deferred_scalars(self, value, lambda floats: host_put_scalar(
            self, name, floats[0], smoothing_hint))

    def resolving(host_method):
        def method(self, *args, **kwargs):
            resolve_deferred_scalars(self)
            return host_method(self, *args, **kwargs)

        method.host = host_method
        method.__name__ = host_method.__name__
        method.__doc__ = host_method.__doc__
        return method

    put_scalar.host = host_put_scalar
    EventStorage.put_scalar = put_scalar
    for name in ("history", "histories", "latest", "latest_with_smoothing_hint",
                 "smoothing_hints"):
        setattr(EventStorage, name, resolving(getattr(EventStorage, name)))
    APPLIED.append("deferred_tensor_scalars")
def patch_dataset_file_names() -> None:
    """Name the file when a Market-1501 or DukeMTMC-reID image name cannot be parsed.

    fast-reid's `process_dir` runs `pattern.search(img_path).groups()`, so one stray file
    ('Thumbs.jpg', a renamed copy) ends the run with "'NoneType' object has no attribute 'groups'",
    and a pid or camera out of range with a bare AssertionError, neither naming the file.
    """
    import glob
    import os
    import re

    from fastreid.data.datasets.dukemtmcreid import DukeMTMC
    from fastreid.data.datasets.market1501 import Market1501

    pattern = re.compile(r"([-\d]+)_c(\d)")  # the host's pattern, searched in the whole path

    def first_bad_name(dir_path: str, max_pid: int, max_camera: int):
        for img_path in sorted(glob.glob(os.path.join(dir_path, "*.jpg"))):
            match = pattern.search(img_path)
            if match is None:
                return img_path, "not a Market-1501 style name (expected PPPP_cC..., e.g. " \
                                 "0002_c1s1_000451_03.jpg)"
            pid, camera = map(int, match.groups())
            if not (-1 <= pid <= max_pid and 1 <= camera <= max_camera):
                return img_path, f"pid {pid} or camera {camera} out of range (pid -1..{max_pid}, " \
                                 f"camera 1..{max_camera})"
        return None

    def naming(host_process_dir, max_pid: int, max_camera: int):
        def process_dir(self, dir_path, *args, **kwargs):
            try:
                return host_process_dir(self, dir_path, *args, **kwargs)
            except (AttributeError, AssertionError) as error:
                bad = first_bad_name(dir_path, max_pid, max_camera)
                if bad is None:
                    raise
                raise ValueError(f"{bad[0]}: {bad[1]}; rename or remove the file") from error
        return process_dir

    Market1501.process_dir = naming(Market1501.process_dir, 1501, 6)
    DukeMTMC.process_dir = naming(DukeMTMC.process_dir, 10 ** 6, 8)
    APPLIED.append("dataset_file_names_named")
def patch_default_trainer_refuses_l2_terms() -> None:
    """Make fast-reid's stock `DefaultTrainer` refuse a config that asks for an L2 term.

    The term is attached by `adaptive_l2.Trainer.build_model`; the stock trainer builds the bare
    model, so with MODEL.REG.NAME adaptive / conventional it trains without any term, and
    says nothing (its contiguous optimizer does not train on torch 2 either, see
    `adaptive_l2.optim`). Its `build_model` now raises, naming the key and the trainer to use.
    """
    from fastreid.engine.defaults import DefaultTrainer

    host_build_model = DefaultTrainer.__dict__["build_model"].__func__

    def build_model(cls, cfg):
        from adaptive_l2.config import l2_term
        from adaptive_l2.trainer import Trainer

        term, key = l2_term(cfg) if hasattr(cfg.MODEL, "REG") else ("none", "")
        if term != "none" and not issubclass(cls, Trainer):
            raise ValueError(
                f"{key} asks for the {term} L2 term but {cls.__name__} is fast-reid's "
                "DefaultTrainer, which builds the model without it (it would train silently "
                "without it): train with adaptive_l2.Trainer (adaptive-l2-train), or set "
                "MODEL.REG.NAME none.")
        return host_build_model(cls, cfg)

    DefaultTrainer.build_model = classmethod(build_model)
    APPLIED.append("default_trainer_refuses_l2_terms")


_done = False


def patch_triplet_loss_global_batch() -> None:
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
    APPLIED.append("triplet_loss_global_batch_fp32")


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
    patch_triplet_loss_global_batch()
    patch_baseline_targets_without_sync()
    patch_deferred_tensor_scalars()
    patch_dataset_file_names()
    patch_evaluator_rerank()  # after it: wraps its build_dist
    patch_default_trainer_refuses_l2_terms()
    _done = True
