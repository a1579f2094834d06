"""Every patch of fast-reid 1.4.0, so that it works on Python 3.11, torch 2.x and NumPy 2.

fast-reid's only PyPI release predates these versions. Each patch is a small function with the
reason in its docstring, in the module of the host area it patches, applied once by
:func:`apply_all` when ``adaptive_l2`` is imported; each returns the names of what it changed,
collected in ``APPLIED`` (a test or a user can see which were needed). No patch copies host code:
each swaps one name for a wrapper or a subclass.

=========================  ========================================================================
module                     what it patches
=========================  ========================================================================
``compat.imports``         names removed from torch / Python that fast-reid imports; torchvision's
                           operator schemas when its C++ extension cannot load
``compat.data``            DataLoaderX without CUDA (``batches_on``), image and dataset file errors
                           that name the file, fast-reid's private sampler builder
                           (``host_train_sampler``)
``compat.evaluation``      re-ranking without a GPU and on the features' device, no compilation
                           or ``sys.exit`` inside an evaluation
``compat.modeling``        out-of-place pixel normalisation, Baseline without a host sync, triplet
                           mining over the global batch in fp32
``compat.engine``          deferred tensor scalars in the event storage, the console writer at one
                           iteration twice, the stock DefaultTrainer refusing an L2 term, the
                           local process group (``create_local_group``) and the writer period
                           (``set_writer_period``) that fast-reid keeps in private state
=========================  ========================================================================

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
                              and env:// join instead
``adaptive_l2.checkpoint``    ``Checkpointer``: torn files on a kill, best model lost on resume;
                              subclass with atomic writes
``adaptive_l2.data.build``    ``build_reid_train_loader`` / test loader: global batches split by
                              process, per-sample augmentation seeds, the config's device
``adaptive_l2.hooks``         ``LayerFreeze``: its switch does not survive a resume; subclass
============================  ===================================================================
"""
from __future__ import annotations

import warnings
from typing import List

from adaptive_l2.compat.data import (CorruptImageError, batches_on, host_train_sampler,
                                     patch_dataloader_cuda_stream, patch_dataset_file_names,
                                     patch_read_image_errors)
from adaptive_l2.compat.engine import (create_local_group, patch_default_trainer_refuses_l2_terms,
                                       patch_deferred_tensor_scalars,
                                       patch_metric_printer_same_iteration, put_deferred_scalars,
                                       resolve_deferred_scalars, set_writer_period)
from adaptive_l2.compat.evaluation import (patch_evaluator_rerank, patch_jaccard_search_device,
                                           patch_rank_evaluator_compile)
from adaptive_l2.compat.imports import patch_removed_std_names, patch_torchvision_op_schemas
from adaptive_l2.compat.modeling import (patch_baseline_targets_without_sync,
                                         patch_inplace_normalization,
                                         patch_triplet_loss_global_batch)

__all__ = [
    "APPLIED",
    "CorruptImageError",
    "apply_all",
    "batches_on",
    "create_local_group",
    "host_train_sampler",
    "put_deferred_scalars",
    "resolve_deferred_scalars",
    "set_writer_period",
]

APPLIED: List[str] = []

_done = False


def apply_all() -> None:
    """Apply every patch once; the order matters (torchvision before fast-reid imports it)."""
    global _done
    if _done:
        return
    APPLIED.extend(patch_torchvision_op_schemas())
    APPLIED.extend(patch_removed_std_names())
    warnings.filterwarnings("ignore", message=".*Cython rank evaluation.*")
    for patch in (patch_dataloader_cuda_stream, patch_rank_evaluator_compile,
                  patch_read_image_errors, patch_inplace_normalization,
                  patch_metric_printer_same_iteration, patch_jaccard_search_device,
                  patch_triplet_loss_global_batch, patch_baseline_targets_without_sync,
                  patch_deferred_tensor_scalars, patch_dataset_file_names,
                  patch_evaluator_rerank,  # after jaccard: wraps its build_dist
                  patch_default_trainer_refuses_l2_terms):
        APPLIED.extend(patch())
    _done = True
