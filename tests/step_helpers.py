"""A training step on a tiny fast-reid model, and a recorder of host syncs: shared by the step's
tests and the compat tests of what the step needs."""
from __future__ import annotations

import itertools
import os
import traceback
from typing import Dict, List

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import adaptive_l2  # noqa: F401  (compat patches before fast-reid imports)
from adaptive_l2.config import load_config
from adaptive_l2.trainer import Trainer, TrainStep
from fastreid.utils.events import EventStorage

from conftest import REPO

BATCH = 8  # P2 x K4
NUM_CLASSES = 4

_SYNC_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default,
             torch.ops.aten.is_nonzero.default}
# Adam's step counters live on the host even when the parameters are on a GPU (torch keeps
# state["step"] on the CPU unless capturable / fused): reading them waits for no device.
_HOST_ONLY_FILES = (os.sep + os.path.join("torch", "optim") + os.sep,)


class SyncCounter(TorchDispatchMode):
    """Records every op that copies a tensor value to Python (a host sync on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _SYNC_OPS:
            frames = traceback.extract_stack()[:-1]
            if not any(part in frame.filename for frame in frames for part in _HOST_ONLY_FILES):
                caller = next((f for f in reversed(frames) if "torch" + os.sep not in f.filename
                               or "site-packages" + os.sep + "fastreid" in f.filename), frames[-1])
                self.syncs.append(f"{func} at {caller.filename}:{caller.lineno} {caller.line}")
        return func(*args, **(kwargs or {}))


def step_config(meta_architecture: str, *extra: str):
    base = "Paper/Base-Paper.yml" if meta_architecture == "TwoBranchReID" else "Base-ReID.yml"
    return load_config(os.path.join(REPO, "configs", base), [
        "MODEL.DEVICE", "cpu", "MODEL.BACKBONE.DEPTH", "18x", "MODEL.BACKBONE.FEAT_DIM", "512",
        "MODEL.BACKBONE.STRIDE_IN_1X1", "False",  # R18 has no bottleneck
        "MODEL.BACKBONE.PRETRAIN", "False", "MODEL.HEADS.NUM_CLASSES", str(NUM_CLASSES),
        "MODEL.TWO_BRANCH.REGIONAL_DIM", "32", "MODEL.FREEZE_LAYERS", "[]",
        "MODEL.REG.NAME", "adaptive", "SOLVER.AMP.ENABLED", "False", "SEED", "0", *extra])


def synthetic_batch(seed: int = 0) -> Dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"images": torch.rand(BATCH, 3, 64, 32, generator=generator) * 255,
            "targets": torch.arange(BATCH) // 4,
            "camids": torch.zeros(BATCH, dtype=torch.long)}


def build_step(cfg, step_class=None) -> TrainStep:
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    optimizer, _ = Trainer.build_optimizer(cfg, model)
    step = Trainer.build_train_step(cfg, model, itertools.repeat(synthetic_batch()), optimizer)
    if step_class is not None:
        step.__class__ = step_class
    return step


def run_steps(step: TrainStep, storage: EventStorage, iterations) -> None:
    for iteration in iterations:
        storage.iter = step.iter = iteration
        step.run_step()
