"""Loading ImageNet-pretrained ResNet weights from a local file, never from the network.

fast-reid's `build_resnet_backbone` downloads weights when `MODEL.BACKBONE.PRETRAIN` is True and
`MODEL.BACKBONE.PRETRAIN_PATH` is empty, and loads a given file with `strict=False`, so a file of
the wrong depth silently leaves most of the network random. Here every backbone tensor must come
from the file with the right shape, or loading fails with the names of the offending keys.
"""
from __future__ import annotations

import logging
import os
import pickle
from typing import Dict, List, Mapping

import torch
from fastreid.config import CfgNode
from torch import nn

logger = logging.getLogger(__name__)

_PATH_KEY = "MODEL.BACKBONE.PRETRAIN_PATH"
# Entries that wrap the weights: fast-reid's Checkpointer saves {"model": ...}, others "state_dict".
_NESTED_STATE_KEYS = ("model", "state_dict")
# Prefixes a backbone key may carry: a fast-reid model ("backbone."), DataParallel ("module.").
_KEY_PREFIXES = ("module.", "backbone.")
# BatchNorm's step counter is absent from older torchvision files and never used in training
# with a fixed momentum, so a file without it is still complete.
_OPTIONAL_SUFFIXES = ("num_batches_tracked",)
_MAX_KEYS_IN_MESSAGE = 5


def check_pretrain_config(cfg: CfgNode) -> None:
    """Refuse `MODEL.BACKBONE.PRETRAIN` without a local file, before fast-reid downloads one."""
    if not cfg.MODEL.BACKBONE.PRETRAIN:
        return
    path = cfg.MODEL.BACKBONE.PRETRAIN_PATH
    if not path:
        raise ValueError(
            f"MODEL.BACKBONE.PRETRAIN is True but {_PATH_KEY} is empty: fast-reid would download "
            "ImageNet weights, and adaptive_l2 never downloads. Put a torchvision or fast-reid "
            f"ResNet file on this machine and set {_PATH_KEY} to it, or set "
            "MODEL.BACKBONE.PRETRAIN False to start from random weights."
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{_PATH_KEY} = {path!r}: no such file. Fix the path or set "
            "MODEL.BACKBONE.PRETRAIN False."
        )


def _read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"pretrained backbone file {path!r} ({_PATH_KEY}) does not exist. Fix the path or set "
            "MODEL.BACKBONE.PRETRAIN False."
        )
    try:
        # weights_only: a pretrained file usually comes from elsewhere; it must hold tensors only.
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(
            f"pretrained backbone file {path!r} ({_PATH_KEY}) cannot be read as a weights-only "
            f"torch file ({reason}). "
            "It must be a state dict saved with torch.save; re-save only the weights "
            "(torch.save(model.state_dict(), path)) and point the key at that file."
        ) from error
    for key in _NESTED_STATE_KEYS:
        if isinstance(data, Mapping) and isinstance(data.get(key), Mapping):
            data = data[key]
            break
    if not isinstance(data, Mapping):
        raise ValueError(
            f"pretrained backbone file {path!r} ({_PATH_KEY}) holds a {type(data).__name__}, "
            "not a state dict; expected a torchvision ResNet state dict or a fast-reid checkpoint "
            "with a 'model' entry."
        )
    return {str(key): value for key, value in data.items() if isinstance(value, torch.Tensor)}


def _strip_prefixes(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Map fast-reid ("backbone.conv1.weight") and torchvision ("conv1.weight") keys to one form."""
    stripped: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key
        for prefix in _KEY_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
        stripped[name] = value
    return stripped


def _first(keys: List[str]) -> str:
    shown = ", ".join(keys[:_MAX_KEYS_IN_MESSAGE])
    more = len(keys) - _MAX_KEYS_IN_MESSAGE
    return shown + (f" (and {more} more)" if more > 0 else "")


def load_pretrained_backbone(module: nn.Module, path: str) -> None:
    """Copy every tensor of a ResNet ``module`` (conv1, bn1, layer1..layer4) from the file ``path``.

    Accepts a torchvision ResNet state dict (its ``fc.*`` is ignored) or a fast-reid checkpoint
    (``{"model": ...}``, keys prefixed ``backbone.``). Raises ``FileNotFoundError`` for a missing
    file and ``ValueError`` naming the first missing or mismatched keys, so an R18 file given to an
    R50 model fails instead of leaving most layers random.
    """
    file_state = _strip_prefixes(_read_state_dict(path))
    target = module.state_dict()
    missing = [
        key for key in target
        if key not in file_state and not key.endswith(_OPTIONAL_SUFFIXES)
    ]
    mismatched = [
        f"{key} (file {tuple(file_state[key].shape)}, model {tuple(value.shape)})"
        for key, value in target.items()
        if key in file_state and file_state[key].shape != value.shape
    ]
    if missing or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} backbone tensors missing: {_first(missing)}")
        if mismatched:
            problems.append(f"{len(mismatched)} shapes differ: {_first(mismatched)}")
        raise ValueError(
            f"pretrained backbone file {path!r} ({_PATH_KEY}) does not fit the model's backbone "
            f"({'; '.join(problems)}). Use a file of the same ResNet depth and variant as "
            "MODEL.BACKBONE.DEPTH / WITH_IBN / WITH_SE."
        )
    loadable = {key: file_state[key] for key in target if key in file_state}
    module.load_state_dict(loadable, strict=False)
    unused = sorted(set(file_state) - set(target))
    logger.info(
        "Loaded %d backbone tensors from %s (%d tensors of the file unused, e.g. %s)",
        len(loadable), path, len(unused), _first(unused) if unused else "none",
    )
