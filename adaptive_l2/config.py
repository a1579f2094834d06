"""The project's config keys, added to fast-reid's defaults before a YAML is merged.

`add_reg_config(cfg)` must run before `merge_from_file`, so yacs rejects a misspelt key instead of
ignoring it. `check_config(cfg)` refuses impossible combinations with a message naming the keys.
`load_config(file, opts)` is all of it in the order a tool needs: defaults, YAML, overrides, checks.
The shipped YAMLs are package data (`adaptive_l2/configs`, also `configs/` in a clone), so a
non-editable install finds them: `config_file_path("Synthetic/adaptive_l2.yml")`.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from importlib import resources
from typing import List, Optional, Tuple

import torch
import yaml
from fastreid.config import CfgNode as CN
from fastreid.config import get_cfg

from adaptive_l2.data.validation import held_out_count

logger = logging.getLogger(__name__)


def add_reg_config(cfg: CN) -> CN:
    """Add the project's keys (with their defaults) to a fast-reid config, in place; returns it."""
    cfg.SEED = -1  # global seed; >= 0 makes a CPU run repeatable (rank r uses SEED + r)

    # Where datasets live. fast-reid reads $FASTREID_DATASETS once at import; this key wins.
    cfg.DATASETS.ROOT = os.getenv("FASTREID_DATASETS", "datasets")
    cfg.DATASETS.SYNTHETIC = CN()
    cfg.DATASETS.SYNTHETIC.SEED = 0  # the generated dataset is a pure function of this seed + sizes
    cfg.DATASETS.SYNTHETIC.NUM_TRAIN_IDS = 64  # identities in bounding_box_train
    cfg.DATASETS.SYNTHETIC.NUM_TEST_IDS = 64  # identities in query + bounding_box_test
    cfg.DATASETS.SYNTHETIC.NUM_DISTRACTORS = 100  # gallery images of identities never queried
    cfg.DATASETS.SYNTHETIC.NUM_CAMERAS = 6  # camera views (Market-1501 has 6)
    cfg.DATASETS.SYNTHETIC.IMAGES_PER_ID = 8  # images per identity, spread over the cameras
    cfg.DATASETS.SYNTHETIC.HEIGHT = 128  # generated image height in pixels
    cfg.DATASETS.SYNTHETIC.WIDTH = 64  # generated image width in pixels
    cfg.DATASETS.SYNTHETIC.DIFFICULTY = 1.0  # scales every nuisance (camera, pose, occlusion); 0-3

    # A validation split carved from the training identities (adaptive_l2.data.validation): the
    # held-out identities leave training and, while on, evaluation uses them instead of
    # DATASETS.TESTS (tuning must not select on the test set). Set one of the two; 0 = off.
    cfg.DATASETS.VALIDATION = CN()
    cfg.DATASETS.VALIDATION.IDENTITIES = 0  # number of training identities held out
    cfg.DATASETS.VALIDATION.FRACTION = 0.0  # or this fraction of them, in [0, 1)
    cfg.DATASETS.VALIDATION.SEED = 0  # which identities, and which of their images are queries

    cfg.SOLVER.ITERS_PER_EPOCH = 0  # iterations per epoch; 0 = len(train set) // IMS_PER_BATCH
    cfg.SOLVER.LOG_PERIOD = 200  # iterations between console / metrics.json / tensorboard writes
    cfg.SOLVER.ADAM_EPS = 1e-8  # Adam's epsilon (the paper's Keras code used 1e-7)
    # SOLVER.SCHED "EpochTableLR": the paper's per-epoch table (warm-up, steps, phase restart)
    cfg.SOLVER.EPOCH_LR = CN()
    cfg.SOLVER.EPOCH_LR.START_LR = 2e-6  # learning rate of epoch 0, rising linearly to BASE_LR
    cfg.SOLVER.EPOCH_LR.WARMUP_EPOCHS = 10  # BASE_LR is reached at epoch WARMUP_EPOCHS - 1
    cfg.SOLVER.EPOCH_LR.MILESTONES = [40, 70]  # epochs where the rate is multiplied by GAMMA
    cfg.SOLVER.EPOCH_LR.GAMMA = 0.1
    cfg.SOLVER.EPOCH_LR.RESTART_EPOCH = 0  # > 0: the table starts again here (phase B)

    cfg.MODEL.REG = CN()
    # The L2 term: "adaptive" (Ni et al. 2020: sum_n A_n * hard_sigmoid(theta_n) * ||W_n||^2, one
    # trainable theta_n, init 0, per trainable tensor W_n), "conventional" (FACTOR * sum_n ||W_n||^2)
    # or "none"
    cfg.MODEL.REG.NAME = "none"
    cfg.MODEL.REG.ADAPTIVE = False  # deprecated: MODEL.REG.NAME adaptive (still read, with a warning)
    cfg.MODEL.REG.AMPLITUDE = 0.005  # A, the largest factor a tensor can get
    cfg.MODEL.REG.AMPLITUDE_PER_KIND = CN()  # per kind of tensor; a negative value means AMPLITUDE
    cfg.MODEL.REG.AMPLITUDE_PER_KIND.KERNEL = -1.0  # conv / linear weights (the classifier too)
    cfg.MODEL.REG.AMPLITUDE_PER_KIND.BIAS = -1.0  # biases of conv / linear layers
    cfg.MODEL.REG.AMPLITUDE_PER_KIND.NORM_WEIGHT = -1.0  # BN / GN / LN scale (gamma)
    cfg.MODEL.REG.AMPLITUDE_PER_KIND.NORM_BIAS = -1.0  # BN / GN / LN shift (beta)
    cfg.MODEL.REG.LOG_PERIOD = 1  # epochs between factor logs (event storage + factors.jsonl)
    # Conventional L2 baseline on the same tensors: penalty FACTOR * sum_n ||W_n||^2
    # (gradient 2 * FACTOR * W: the original's Keras l2(0.005) equals torch weight decay 0.01).
    # ENABLED is deprecated: MODEL.REG.NAME conventional (still read, with a warning)
    cfg.MODEL.REG.CONVENTIONAL = CN({"ENABLED": False})
    cfg.MODEL.REG.CONVENTIONAL.FACTOR = 0.005

    # SGP (reconstructed from the abstract of Zhou et al., TCSVT 2023; no code was released).
    cfg.MODEL.REG.SGP = CN({"ENABLED": False})
    cfg.MODEL.REG.SGP.MODE = "feature"  # "feature" (SGP-F) or "parameter" (SGP-P, ablation)
    cfg.MODEL.REG.SGP.ALPHA = 0.1  # noise norm relative to the gradient norm, per sample / tensor
    cfg.MODEL.REG.SGP.PROB = 1.0  # probability a sample (SGP-F) or tensor (SGP-P) is perturbed
    cfg.MODEL.REG.SGP.NOISE = "gaussian"  # "gaussian", "uniform" or "rademacher" (unit variance)
    cfg.MODEL.REG.SGP.SITES = ["backbone"]  # SGP-F: module names whose output gradient is perturbed
    cfg.MODEL.REG.SGP.START_ITER = 0  # no perturbation before this iteration
    cfg.MODEL.REG.SGP.SEED = 1234  # SGP's own random stream (rank r adds r for SGP-F)
    # Adversarial-training baseline: metric FGSM / PGD-k examples trained beside the clean batch.
    cfg.MODEL.REG.AT = CN({"ENABLED": False})
    cfg.MODEL.REG.AT.EPS = 4.0  # L-infinity budget on the 0-255 pixel scale
    cfg.MODEL.REG.AT.STEPS = 1  # 1: FGSM (random start eps/4), k: PGD-k (step eps/4)
    cfg.MODEL.REG.AT.WEIGHT = 1.0  # weight of the adversarial losses (1: one 2B-image batch)
    cfg.MODEL.REG.AT.SEED = 4321  # the attack's own random stream (random starts)

    # Several processes (DDP): by default one experiment whatever their number (see
    # adaptive_l2/global_batch.py): the sampler splits the global batch between processes,
    # BatchNorm statistics and batch-hard mining run over the global batch.
    cfg.DISTRIBUTED = CN()
    # True: BatchNorm and metric losses use each process's share only (faster, fewer all-reduces;
    # changes the experiment with the number of processes; a warning says so)
    cfg.DISTRIBUTED.PER_PROCESS_STATISTICS = False

    from adaptive_l2.modeling.two_branch import add_two_branch_config

    add_two_branch_config(cfg)

    # Data pipeline of the original Keras code (the paper rows); the defaults keep fast-reid's.
    cfg.INPUT.RESIZE_IMPL = "pil_bicubic"  # "pil_bicubic" (fast-reid) or "cv2_bilinear" (original)
    cfg.INPUT.REA.IMPL = "fastreid"  # random erasing: "fastreid" (torchvision) or "keras" (original)

    # Fidelity to the original Keras code: optimizer, backbone and pixel preprocessing.
    cfg.SOLVER.ADAM_GLOBAL_STEP = False  # True: Adam's bias correction uses one global step count
    cfg.MODEL.BACKBONE.NORM_MOMENTUM = -1.0  # torch momentum of the backbone's BN; < 0: the host's
    cfg.MODEL.BACKBONE.NORM_EPS = -1.0  # epsilon of the backbone's BN; < 0: the host's (1e-5)
    cfg.MODEL.BACKBONE.STRIDE_IN_1X1 = False  # True: bottleneck stride on the 1x1 conv (ResNet v1)
    cfg.MODEL.PIXEL_FORMAT = "RGB"  # "BGR": channels flipped before PIXEL_MEAN / PIXEL_STD apply

    # Reliability: stop a diverging run instead of reporting its garbage as a result.
    cfg.SOLVER.DIVERGENCE = CN({"ENABLED": True})  # stop on a non-finite or exploding total loss
    cfg.SOLVER.DIVERGENCE.FACTOR = 100.0  # stop when the loss exceeds FACTOR x its early value
    cfg.SOLVER.DIVERGENCE.EARLY_ITERS = 10  # early value: smallest loss of the run's first N iters

    # k-reciprocal re-ranking (TEST.RERANK.ENABLED, K1, K2, LAMBDA are fast-reid's keys).
    # "fastreid" (fast-reid's) or "original" (Zhong et al.'s code as the paper ran it)
    cfg.TEST.RERANK.VARIANT = "fastreid"

    # L2 penalty, decoupled variant (applied as AdamW applies its weight decay).
    # True: each step W_n *= 1 - lr * 2 * lambda_n (lr of W_n's group) outside the optimizer's
    # normalisation; the thetas still learn from the penalty's value. False: the paper's coupled term.
    cfg.MODEL.REG.DECOUPLED = False
    return cfg


L2_TERMS = ("adaptive", "conventional", "none")
_DEPRECATED_SWITCHES = (("MODEL.REG.ADAPTIVE", "adaptive"),
                        ("MODEL.REG.CONVENTIONAL.ENABLED", "conventional"))


def l2_term(cfg: CN) -> Tuple[str, str]:
    """The L2 term the config asks for, and the key that asks for it: MODEL.REG.NAME, or one of
    the deprecated switches MODEL.REG.ADAPTIVE / CONVENTIONAL.ENABLED (read with a FutureWarning,
    so configs written for them keep training the same term)."""
    reg = cfg.MODEL.REG
    name = str(reg.NAME).lower()
    if name not in L2_TERMS:
        raise ValueError(f"MODEL.REG.NAME must be one of {', '.join(L2_TERMS)}, got '{reg.NAME}'")
    switched = [(key, term) for key, term in _DEPRECATED_SWITCHES
                if (reg.ADAPTIVE if term == "adaptive" else reg.CONVENTIONAL.ENABLED)]
    if len(switched) == 2:
        raise ValueError(
            "MODEL.REG.ADAPTIVE and MODEL.REG.CONVENTIONAL.ENABLED are both True: the tensors would "
            "be penalized twice. Set MODEL.REG.NAME to adaptive or conventional instead.")
    if not switched:
        return name, "MODEL.REG.NAME"
    key, term = switched[0]
    if name not in ("none", term):
        raise ValueError(f"MODEL.REG.NAME is '{name}' but the deprecated {key} is True: set only "
                         "MODEL.REG.NAME")
    warnings.warn(f"{key} is deprecated: set MODEL.REG.NAME {term} instead", FutureWarning,
                  stacklevel=2)
    return term, key


def regularizer_enabled(cfg: CN) -> bool:
    """Whether an L2 term (adaptive or conventional) replaces the optimizer's weight decay."""
    return l2_term(cfg)[0] != "none"


def check_config(cfg: CN) -> None:
    """Refuse impossible or unsupported combinations before anything is built."""
    l2_term(cfg)  # a known MODEL.REG.NAME, no contradicting deprecated switch
    if cfg.MODEL.REG.AMPLITUDE < 0:
        raise ValueError(f"MODEL.REG.AMPLITUDE must be >= 0, got {cfg.MODEL.REG.AMPLITUDE}")
    if cfg.MODEL.REG.CONVENTIONAL.FACTOR < 0:
        raise ValueError(
            f"MODEL.REG.CONVENTIONAL.FACTOR must be >= 0, got {cfg.MODEL.REG.CONVENTIONAL.FACTOR}"
        )
    validation = cfg.DATASETS.VALIDATION
    held_out_count(validation.IDENTITIES, validation.FRACTION, num_ids=sys.maxsize)
    sgp = cfg.MODEL.REG.SGP
    if sgp.MODE not in ("feature", "parameter"):
        raise ValueError(f"MODEL.REG.SGP.MODE must be 'feature' or 'parameter', got '{sgp.MODE}'")
    if sgp.NOISE not in ("gaussian", "uniform", "rademacher"):
        raise ValueError(f"MODEL.REG.SGP.NOISE must be gaussian, uniform or rademacher, got "
                         f"'{sgp.NOISE}'")
    if not (sgp.ALPHA >= 0 and 0 <= sgp.PROB <= 1):
        raise ValueError(f"MODEL.REG.SGP.ALPHA must be >= 0 and PROB in [0, 1], got "
                         f"{sgp.ALPHA}, {sgp.PROB}")
    if cfg.MODEL.REG.AT.ENABLED and (cfg.MODEL.REG.AT.EPS <= 0 or cfg.MODEL.REG.AT.STEPS < 1):
        raise ValueError("MODEL.REG.AT.EPS must be > 0 and MODEL.REG.AT.STEPS >= 1")
    if cfg.MODEL.REG.AT.ENABLED and cfg.MODEL.REG.AT.WEIGHT != 1.0 and regularizer_enabled(cfg):
        raise ValueError("MODEL.REG.AT.WEIGHT != 1 runs two forwards per step, each adding the L2 "
                         "penalty: use MODEL.REG.AT.WEIGHT 1.0 with MODEL.REG.NAME adaptive / conventional")
    divergence = cfg.SOLVER.DIVERGENCE
    if divergence.ENABLED and not (divergence.FACTOR > 1 and divergence.EARLY_ITERS >= 1):
        raise ValueError("SOLVER.DIVERGENCE.FACTOR must be > 1 and SOLVER.DIVERGENCE.EARLY_ITERS "
                         f">= 1, got {divergence.FACTOR} and {divergence.EARLY_ITERS}")
    device = str(cfg.MODEL.DEVICE)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"MODEL.DEVICE is '{device}' but this machine has no usable CUDA device "
            "(torch.cuda.is_available() is False). Add `MODEL.DEVICE cpu` to the command line or "
            "the config to train on the CPU."
        )
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ValueError(f"MODEL.DEVICE must be 'cpu' or 'cuda[:N]', got '{device}'")


def shipped_configs_dir() -> str:
    """The folder of the YAMLs shipped with the package (package data, wherever it is installed)."""
    return str(resources.files("adaptive_l2").joinpath("configs"))


def config_file_path(config_file: str) -> str:
    """`config_file` as given when it exists (relative to the current folder); otherwise, for a
    name such as `configs/Synthetic/adaptive_l2.yml` or `Synthetic/adaptive_l2.yml`, the shipped
    copy, so the README's commands work from any folder after a non-editable install."""
    if os.path.isfile(config_file):
        return config_file
    relative = os.path.normpath(config_file)
    if relative.startswith("configs" + os.sep):
        relative = relative[len("configs" + os.sep):]
    shipped = os.path.join(shipped_configs_dir(), relative)
    if not os.path.isabs(config_file) and os.path.isfile(shipped):
        return shipped
    raise FileNotFoundError(f"--config-file '{config_file}' does not exist (looked in the current "
                            f"folder {os.getcwd()} and in the shipped configs {shipped_configs_dir()})")


def _config_error(where: str, error: Exception) -> Exception:
    """yacs reports a typo as KeyError or AssertionError and a wrong type as ValueError or
    AssertionError; say where, and keep KeyError for unknown keys."""
    message = f"{where}: {error.args[0] if error.args else error}"
    return KeyError(message) if "Non-existent" in message else ValueError(message)


def load_config(config_file: str, opts: Optional[List[str]] = None) -> CN:
    """fast-reid defaults + the project's keys + the YAML + command-line overrides, checked."""
    cfg = get_cfg()
    add_reg_config(cfg)
    if config_file:
        config_file = config_file_path(config_file)
        try:
            cfg.merge_from_file(config_file)
        except (UnicodeDecodeError, yaml.YAMLError, AttributeError, TypeError) as error:
            # a binary file, broken YAML, or YAML that is not a mapping of keys
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ValueError(f"--config-file '{config_file}' is not a YAML config of KEY: value "
                             f"lines ({type(error).__name__}: {reason})") from error
        except (KeyError, AssertionError, ValueError) as error:
            raise _config_error(f"{config_file}", error) from error
    try:
        cfg.merge_from_list(opts or [])
    except (KeyError, AssertionError, ValueError) as error:
        raise _config_error("command-line override", error) from error
    check_config(cfg)
    return cfg
