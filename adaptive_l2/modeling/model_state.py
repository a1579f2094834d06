"""What several parts of the project ask of a model, in one place: the module inside a DDP wrapper,
the device it lives on, and its train/eval modes saved and restored module by module (attacks and
the robustness evaluation run in eval mode, then give each module back the mode it had)."""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The wrapped module of DistributedDataParallel / DataParallel, else ``model``."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for an empty model); a DDP
    wrapper is looked through. Attacks and autocast follow it instead of assuming CUDA."""
    model = unwrap_model(model)
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def save_modes(model: nn.Module) -> List[Tuple[nn.Module, bool]]:
    """Every module of ``model`` with its training flag, for :func:`restore_modes`."""
    return [(module, module.training) for module in model.modules()]


def restore_modes(modes: List[Tuple[nn.Module, bool]]) -> None:
    """Give each module the flag :func:`save_modes` recorded."""
    # Per module, not model.train(mode): children frozen in eval mode (LayerFreeze) stay so.
    for module, training in modes:
        module.training = training
