"""Patches of fast-reid's data side: loaders without CUDA, and errors that name the file."""
from __future__ import annotations

import contextlib
from typing import List, Optional

import torch


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


def patch_dataloader_cuda_stream() -> List[str]:
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
    return ["dataloader_without_cuda"]


class CorruptImageError(OSError):
    """An image file of a dataset cannot be decoded."""


def patch_read_image_errors() -> List[str]:
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
    return ["read_image_names_file"]


def patch_dataset_file_names() -> List[str]:
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
    return ["dataset_file_names_named"]


def host_train_sampler(cfg, train_set):
    """fast-reid's own training sampler for DATALOADER.SAMPLER_TRAIN over `train_set`.

    fast-reid builds its samplers only inside the private `_train_loader_from_config` (with the
    loader's other arguments); the project wraps the sampler alone (per-sample seeds, resume at a
    batch), so the private function is called here, in one place, and its sampler taken.
    """
    from fastreid.data.build import _train_loader_from_config

    return _train_loader_from_config(cfg, train_set=train_set,
                                     transforms=train_set.transform)["sampler"]
