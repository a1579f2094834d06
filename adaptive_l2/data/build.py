"""Dataset and loader construction with the dataset root taken from the config.

fast-reid reads its dataset root once, from $FASTREID_DATASETS at import; here it comes from
`DATASETS.ROOT`, the embedded synthetic dataset gets its sizes from `DATASETS.SYNTHETIC`, and a
missing real dataset is an error that says where its files must go.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
from collections import Counter
from typing import Iterator, List, Sequence, Tuple

import numpy as np
import torch
from fastreid.data.build import build_reid_test_loader, build_reid_train_loader
from fastreid.data.common import CommDataset
from fastreid.data.datasets import DATASET_REGISTRY
from fastreid.utils import comm

from adaptive_l2.compat import batches_on, host_train_sampler
from adaptive_l2.data.samplers import (ChunkedIdentitySampler, PositionSeededSampler,
                                       StrictIdentitySampler)
from adaptive_l2.data.transforms import build_transforms
from adaptive_l2.data.validation import (VALIDATION_SET, ValidationSplit, split_validation,
                                         validation_enabled)

logger = logging.getLogger(__name__)

# Samplers of the project: global batches split between processes (see data.samplers).
GLOBAL_BATCH_SAMPLERS = {"StrictIdentitySampler": StrictIdentitySampler,
                         "ChunkedIdentitySampler": ChunkedIdentitySampler}

# How each supported real dataset must be laid out under DATASETS.ROOT (fast-reid's loaders).
DATASET_LAYOUTS = {
    "Market1501": "Market-1501-v15.09.15/{bounding_box_train,query,bounding_box_test}/*.jpg",
    "DukeMTMC": "DukeMTMC-reID/{bounding_box_train,query,bounding_box_test}/*.jpg",
    "MSMT17": "MSMT17_V2/{mask_train_v2,mask_test_v2}/ plus list_{train,val,query,gallery}.txt",
}
DATASET_LAYOUTS["MSMT17TrainVal"] = DATASET_LAYOUTS["MSMT17"]


def synthetic_kwargs(cfg) -> dict:
    syn = cfg.DATASETS.SYNTHETIC
    return {
        "seed": syn.SEED, "num_train_ids": syn.NUM_TRAIN_IDS, "num_test_ids": syn.NUM_TEST_IDS,
        "num_distractors": syn.NUM_DISTRACTORS, "num_cameras": syn.NUM_CAMERAS,
        "images_per_id": syn.IMAGES_PER_ID, "height": syn.HEIGHT, "width": syn.WIDTH,
        "difficulty": syn.DIFFICULTY,
    }


def build_dataset(cfg, name: str, **kwargs):
    """Instantiate a registered dataset under DATASETS.ROOT, with a clear error if it is missing."""
    root = cfg.DATASETS.ROOT
    try:
        dataset_class = DATASET_REGISTRY.get(name)
    except KeyError as error:
        raise KeyError(
            f"DATASETS: unknown dataset '{name}'; registered: {sorted(DATASET_REGISTRY._obj_map)}"
        ) from error
    if name == "SyntheticReID":
        kwargs = {**synthetic_kwargs(cfg), **kwargs}
    try:
        return dataset_class(root=root, **kwargs)
    except (RuntimeError, AssertionError) as error:
        # fast-reid says "... is not found" (RuntimeError) or, for MSMT17, asserts
        if "not found" not in str(error):
            raise
        layout = DATASET_LAYOUTS.get(name, "the layout fast-reid's loader for it expects")
        raise FileNotFoundError(
            f"dataset '{name}' not found under DATASETS.ROOT='{os.path.abspath(root)}' ({error}). "
            f"Download it yourself and lay it out as {os.path.join(root, layout)}; set "
            "DATASETS.ROOT (or $FASTREID_DATASETS) to the folder that holds it."
        ) from error


@contextlib.contextmanager
def seeded_random_streams(seed: int) -> Iterator[None]:
    """Python's, NumPy's and torch's CPU random streams seeded with `seed` inside, restored after.

    Augmentation (flip, crop, erasing) draws from these global streams; seeding them per sample
    makes it independent of data-loader workers, of the number of processes and of a resume."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class SeededSampleDataset(CommDataset):
    """fast-reid's CommDataset whose augmentation is seeded by the sample's own seed
    (`samplers.SampleRef`), when the sampler gives one."""

    def __getitem__(self, index):
        seed = getattr(index, "seed", None)
        if seed is None:
            return super().__getitem__(index)
        with seeded_random_streams(seed):
            return super().__getitem__(int(index))


def sampler_seed(cfg) -> int:
    """SEED when it is set (the same on every process), else one random seed shared by all."""
    return cfg.SEED if cfg.SEED >= 0 else int(comm.shared_random_seed())


def build_train_sampler(cfg, train_set: CommDataset):
    """The configured sampler, resumable (`start_at_batch`) and seeding each sample."""
    name = cfg.DATALOADER.SAMPLER_TRAIN
    seed = sampler_seed(cfg)
    if name in GLOBAL_BATCH_SAMPLERS:
        return GLOBAL_BATCH_SAMPLERS[name](train_set.img_items, cfg.SOLVER.IMS_PER_BATCH,
                                           cfg.DATALOADER.NUM_INSTANCE, seed=seed)
    if comm.get_world_size() > 1:
        logger.warning(
            "DATALOADER.SAMPLER_TRAIN %s is fast-reid's: each of the %d processes draws its own "
            "share, so the run is not the same experiment as one process with the same global "
            "batch. Use StrictIdentitySampler for that.", name, comm.get_world_size())
    per_process = cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
    host_sampler = host_train_sampler(cfg, train_set)
    return PositionSeededSampler(host_sampler, per_process, seed, comm.get_rank())
# fast-reid's samplers that build every batch from P identities x K (DATALOADER.NUM_INSTANCE)
# images: they loop for ever, at 100 % CPU and without a word, when a batch cannot be formed.
# The project's own samplers (GLOBAL_BATCH_SAMPLERS) refuse such settings when they are built.
HOST_IDENTITY_SAMPLERS = ("NaiveIdentitySampler", "BalancedIdentitySampler", "SetReWeightSampler")


def _folder_of(data, split: str) -> str:
    return getattr(data, f"{split}_dir", None) or getattr(data, "dataset_dir", "?")


def check_batches_possible(cfg, items: Sequence) -> None:
    """Refuse, before training, a batch the configured sampler could never form (any sampler)."""
    sampler = cfg.DATALOADER.SAMPLER_TRAIN
    total, k = cfg.SOLVER.IMS_PER_BATCH, cfg.DATALOADER.NUM_INSTANCE
    world = comm.get_world_size()
    if total < 1 or total % world:
        raise ValueError(f"SOLVER.IMS_PER_BATCH ({total}) must be a positive multiple of the "
                         f"number of processes ({world})")
    if sampler not in HOST_IDENTITY_SAMPLERS:
        return  # the project's samplers check themselves; image-level ones repeat the set
    per_process = total // world
    if k < 1 or per_process % k:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH ({total}, {per_process} per process) must be a multiple of "
            f"DATALOADER.NUM_INSTANCE ({k}): {sampler} builds batches of identities x "
            f"NUM_INSTANCE images and would never complete one")
    counts = Counter(item[1] for item in items)
    needed = total // k  # fast-reid's samplers split one global batch over the processes
    if len(counts) < needed:
        raise ValueError(
            f"{sampler} needs SOLVER.IMS_PER_BATCH / DATALOADER.NUM_INSTANCE = {total} / {k} = "
            f"{needed} identities per batch, but the training set "
            f"({', '.join(cfg.DATASETS.NAMES)}) has {len(counts)} ({len(counts)} identities, "
            f"{len(items)} images). Lower SOLVER.IMS_PER_BATCH or DATALOADER.NUM_INSTANCE.")


def training_items(cfg, show: bool = True) -> List:
    """Every (path, pid, camid) of the DATASETS.NAMES training sets, in order."""
    items = []
    for name in cfg.DATASETS.NAMES:
        data = build_dataset(cfg, name, combineall=cfg.DATASETS.COMBINEALL)
        if not data.train:
            raise ValueError(f"dataset '{name}' has no training images: {_folder_of(data, 'train')} "
                             "holds no image fast-reid's loader reads (*.jpg)")
        if show and comm.is_main_process():
            data.show_train()
        items.extend(data.train)
    return items


def validation_split(cfg, items: Sequence) -> ValidationSplit:
    """The DATASETS.VALIDATION split of the training items (everything stays training when off)."""
    validation = cfg.DATASETS.VALIDATION
    return split_validation(items, identities=validation.IDENTITIES,
                            fraction=validation.FRACTION, seed=validation.SEED)


def build_train_loader(cfg):
    items = training_items(cfg)
    if validation_enabled(cfg):
        split = validation_split(cfg, items)
        logger.info("DATASETS.VALIDATION: %d of %d training identities held out (%d query, %d "
                    "gallery images); %d identities, %d images left to train on",
                    len(split.held_out), len(split.held_out) + len({i[1] for i in split.train}),
                    len(split.query), len(split.gallery), len({i[1] for i in split.train}),
                    len(split.train))
        items = split.train
    check_batches_possible(cfg, items)
    train_set = SeededSampleDataset(items, build_transforms(cfg, is_train=True), relabel=True)
    sampler = build_train_sampler(cfg, train_set)
    with batches_on(cfg.MODEL.DEVICE):
        return build_reid_train_loader(cfg, train_set=train_set, sampler=sampler)


def train_sampler_of(data_loader):
    """The sampler behind a loader built by `build_train_loader` (for `start_at_batch`)."""
    return data_loader.batch_sampler.sampler


def build_test_loader(cfg, dataset_name: str) -> Tuple[object, int]:
    """Query + gallery of a test set, or of the validation split when `dataset_name` is
    VALIDATION_SET (the trainer evaluates on it while DATASETS.VALIDATION is on)."""
    if dataset_name == VALIDATION_SET:
        split = validation_split(cfg, training_items(cfg, show=False))
        query, gallery = split.query, split.gallery
    else:
        data = build_dataset(cfg, dataset_name)
        for split_name, images in (("query", data.query), ("gallery", data.gallery)):
            if not images:
                raise ValueError(f"dataset '{dataset_name}' has no {split_name} images: "
                                 f"{_folder_of(data, split_name)} holds no image fast-reid's loader reads")
        if comm.is_main_process():
            data.show_test()
        query, gallery = data.query, data.gallery
    test_set = CommDataset(query + gallery, build_transforms(cfg, is_train=False), relabel=False)
    with batches_on(cfg.MODEL.DEVICE):
        loader, num_query = build_reid_test_loader(
            test_set=test_set, test_batch_size=cfg.TEST.IMS_PER_BATCH,
            num_query=len(query), num_workers=cfg.DATALOADER.NUM_WORKERS)
    return loader, num_query
