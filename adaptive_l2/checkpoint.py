"""Checkpoints that survive pre-emption, and weights for evaluation that must fit the model.

`SafeCheckpointer` is fast-reid's Checkpointer (same arguments, any extra checkpointables) with:
- atomic writes: a checkpoint and `last_checkpoint` go to a temporary file in the same folder that
  is renamed over the old one, so a kill or a full disk never leaves a torn file; a failed write
  raises an error naming the file and the reason;
- a resume that survives torn files: a checkpoint that cannot be read (truncated, empty) or an
  empty `last_checkpoint` is reported by name and the newest intact checkpoint is used instead;
- a best model kept across resume: fast-reid's hook starts again from best_metric = -1 after a
  resume; here `model_best.pth` is only replaced by a strictly better metric than the one it holds.

`load_for_evaluation`: fast-reid's Checkpointer loads non-strictly and only logs skipped or
mismatched tensors, so a checkpoint of another model evaluates random weights in silence. For
evaluation every model tensor must come from the file and every tensor of the file must fit the
model, except the L2 penalty's thetas (a checkpoint trained without the penalty evaluates the
same: thetas do not touch the features).
"""
from __future__ import annotations

import logging
import math
import os
import pickle
import re
import uuid
import zipfile
from typing import Any, Dict, List, Optional

import torch
from fastreid.utils.checkpoint import Checkpointer
from torch import nn

from adaptive_l2.regularizers.l2_base import PENALTY_ATTRIBUTE
from adaptive_l2.run_files import BEST_MODEL, LAST_CHECKPOINT

logger = logging.getLogger(__name__)

BEST_NAME = BEST_MODEL
# Periodic and final checkpoints, newest last when sorted by this key (model_final after all).
_RESUMABLE = re.compile(r"^model_(\d{4,}|final)\.pth$")
# What torch.load raises on a truncated, empty or foreign file.
_READ_ERRORS = (EOFError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError,
                KeyError, UnicodeDecodeError, OSError, AttributeError, TypeError, IndexError)


class RandomStreams:
    """The process's global random streams (python, NumPy, torch CPU) as a checkpointable.

    The project's own randomness is keyed (per-sample augmentation seeds, SGP / AT streams per
    iteration, samplers by batch number), so nothing it draws depends on these; they are saved so
    that code of the user's that draws from them resumes where it stopped too. Checkpoints are
    written by the main process: its streams are restored there; other processes keep theirs."""

    def state_dict(self) -> Dict[str, Any]:
        import random

        import numpy as np

        # plain types and tensors only: torch.load reads checkpoints with weights_only
        kind, keys, position, has_gauss, gauss = np.random.get_state()
        return {"python": random.getstate(), "torch": torch.get_rng_state(),
                "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(position),
                          int(has_gauss), float(gauss)]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        import random

        import numpy as np
        from fastreid.utils import comm

        if not comm.is_main_process():
            return
        random.setstate(state["python"])
        kind, keys, position, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
        torch.set_rng_state(state["torch"])


class CheckpointReadError(ValueError):
    """A checkpoint file that torch.load cannot read: torn, empty, or not a checkpoint."""


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (full disk, no permission); nothing torn is left."""


def write_atomically(path: str, write, mode: str = "wb") -> None:
    """Write `path` through `write(handle)` into a temporary sibling renamed over `path`, so a reader
    sees the old file or the new one, never half of one. On failure the temporary file is removed
    and CheckpointWriteError names `path` and the reason."""
    folder = os.path.dirname(os.path.abspath(path))
    temp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(temp, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except (OSError, RuntimeError) as error:
        if os.path.exists(temp):
            os.remove(temp)
        reason = getattr(error, "strerror", None) or str(error).strip().splitlines()[0]
        raise CheckpointWriteError(
            f"could not write {path} ({reason}); the previous file, if any, is intact. Free space "
            f"in {folder} or set OUTPUT_DIR to another disk, then run again with --resume"
        ) from error


def _checkpoint_order(name: str) -> float:
    number = _RESUMABLE.match(name).group(1)
    return math.inf if number == "final" else int(number)


class SafeCheckpointer(Checkpointer):
    """fast-reid's Checkpointer with atomic writes, resume past torn files, and a best model that a
    resumed run never replaces by a worse one (see the module docstring)."""

    def __init__(self, model: nn.Module, save_dir: str = "", *, save_to_disk: bool = True,
                 **checkpointables: Any):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.best_metric = -math.inf  # the metric model_best.pth holds; restored on resume
        self._loaded: Dict[str, Any] = {}  # a file already read while looking for an intact one

    # -- writing -------------------------------------------------------------------------------
    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        metric = kwargs.get("metric")
        if name == BEST_NAME and metric is not None and metric <= self.best_metric:
            logger.info("Kept %s.pth: its metric %.4f is not beaten by %.4f", BEST_NAME,
                        self.best_metric, metric)
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        path = os.path.join(self.save_dir, f"{name}.pth")
        logger.info("Saving checkpoint to %s", path)
        write_atomically(path, lambda handle: torch.save(data, handle))
        if name == BEST_NAME and metric is not None:
            self.best_metric = float(metric)
        self.tag_last_checkpoint(f"{name}.pth")

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        write_atomically(os.path.join(self.save_dir, LAST_CHECKPOINT),
                         lambda handle: handle.write(last_filename_basename), mode="w")

    # -- reading -------------------------------------------------------------------------------
    def _load_file(self, f: str):
        if f in self._loaded:
            return self._loaded.pop(f)
        if os.path.isfile(f) and os.path.getsize(f) == 0:
            raise CheckpointReadError(f"checkpoint {f} is empty (0 bytes)")
        try:
            return super()._load_file(f)
        except _READ_ERRORS as error:
            reason = (str(error).strip().splitlines() or [""])[0]
            raise CheckpointReadError(
                f"checkpoint {f} cannot be read by torch.load: it is torn (a run killed while "
                f"writing it?) or not a checkpoint ({type(error).__name__}: {reason})") from error

    def resumable_files(self) -> List[str]:
        """The run's periodic and final checkpoints, newest first."""
        if not self.save_dir or not os.path.isdir(self.save_dir):
            return []
        names = sorted((n for n in os.listdir(self.save_dir) if _RESUMABLE.match(n)),
                       key=_checkpoint_order, reverse=True)
        return [os.path.join(self.save_dir, n) for n in names]

    def has_checkpoint(self) -> bool:
        return super().has_checkpoint() or bool(self.resumable_files())

    def get_checkpoint_file(self) -> str:
        """The newest intact checkpoint: the one `last_checkpoint` names if it reads, else the newest
        that does, each unreadable one reported by name; raises if none is intact."""
        tagged = super().get_checkpoint_file()
        candidates = self.resumable_files()
        if tagged and os.path.isfile(tagged):
            candidates = [tagged] + [c for c in candidates if c != tagged]
        else:
            logger.warning("%s names no checkpoint file (%r): looking for the newest intact "
                           "checkpoint in %s", os.path.join(self.save_dir, LAST_CHECKPOINT),
                           os.path.basename(tagged) if tagged else "", self.save_dir)
        for path in candidates:
            try:
                self._loaded = {path: self._load_file(path)}
            except CheckpointReadError as error:
                logger.warning("%s; trying an earlier checkpoint", error)
                continue
            if path != tagged:
                logger.warning("Resuming from %s, the newest intact checkpoint", path)
            return path
        raise CheckpointReadError(
            f"--resume: no intact checkpoint in {self.save_dir} (tried "
            f"{', '.join(os.path.basename(c) for c in candidates) or 'none'}); start without "
            "--resume, or restore a checkpoint")

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        checkpoint = super().resume_or_load(path, resume=resume)
        if resume and self.has_checkpoint():
            self.best_metric = self._best_metric_on_disk()
        return checkpoint

    def _best_metric_on_disk(self) -> float:
        """The metric model_best.pth was saved with (-inf if absent or unreadable: replace it)."""
        path = os.path.join(self.save_dir, f"{BEST_NAME}.pth")
        if not os.path.isfile(path):
            return -math.inf
        try:
            # mmap: only the small "metric" entry is read, not gigabytes of weights
            metric = torch.load(path, map_location="cpu", mmap=True).get("metric")
        except _READ_ERRORS as error:
            logger.warning("%s cannot be read (%s): the next evaluation replaces it", path,
                           type(error).__name__)
            return -math.inf
        if metric is None:
            return -math.inf
        logger.info("Resumed: %s holds metric %.4f; only a better model replaces it", path, metric)
        return float(metric)


def load_for_evaluation(model: nn.Module, path: str) -> None:
    """Load `path` into `model`; raise if any non-penalty tensor is missing or of another shape."""
    if not path:
        raise ValueError("MODEL.WEIGHTS is empty: give the checkpoint to evaluate")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MODEL.WEIGHTS '{path}' does not exist")
    checkpointer = SafeCheckpointer(model)
    try:
        checkpoint = checkpointer._load_file(path)
    except CheckpointReadError as error:
        raise ValueError(f"MODEL.WEIGHTS: {error}") from error
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise ValueError(f"MODEL.WEIGHTS '{path}' is not a fast-reid checkpoint (no 'model' entry)")
    incompatible = checkpointer._load_model(checkpoint)
    ours = PENALTY_ATTRIBUTE + "."
    # A classifier built with MODEL.HEADS.NUM_CLASSES 0 (the number is learnt from the training
    # set) is empty at evaluation, where it plays no part: its size may differ from the file's.
    classes_unknown = {k for k, _, model_shape in incompatible.incorrect_shapes if 0 in model_shape}
    incompatible = incompatible._replace(incorrect_shapes=[
        entry for entry in incompatible.incorrect_shapes if entry[0] not in classes_unknown])
    missing = [k for k in incompatible.missing_keys
               if not k.startswith(ours) and k not in classes_unknown]
    unexpected = [k for k in incompatible.unexpected_keys if not k.startswith(ours)]
    if incompatible.incorrect_shapes or missing or unexpected:
        shapes = ", ".join(f"{k}: {a} in file vs {b} in model"
                           for k, a, b in incompatible.incorrect_shapes[:5])
        raise ValueError(
            f"MODEL.WEIGHTS '{path}' does not match the configured model "
            f"({len(incompatible.incorrect_shapes)} tensors of another shape{': ' + shapes if shapes else ''}; "
            f"{len(missing)} missing{': ' + ', '.join(missing[:5]) if missing else ''}; "
            f"{len(unexpected)} unknown to the model{': ' + ', '.join(unexpected[:5]) if unexpected else ''}). "
            "Was it trained with another MODEL.META_ARCHITECTURE / MODEL.BACKBONE config?")
