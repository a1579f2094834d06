"""Dataset and loader construction with the dataset root taken from the config.

fast-reid reads its dataset root once, from $FASTREID_DATASETS at import; here it comes from
`DATASETS.ROOT`, the embedded synthetic dataset gets its sizes from `DATASETS.SYNTHETIC`, and a
missing real dataset is an error that says where its files must go.
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Sequence, Tuple

from fastreid.data.build import build_reid_test_loader, build_reid_train_loader
from fastreid.data.common import CommDataset
from fastreid.data.datasets import DATASET_REGISTRY
from fastreid.data.transforms import build_transforms
from fastreid.utils import comm

from adaptive_l2.compat import batches_on
from adaptive_l2.data.samplers import StrictIdentitySampler

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


# Samplers that build every batch from P identities x K (DATALOADER.NUM_INSTANCE) images: fast-reid's
# loop for ever, at 100 % CPU and without a word, when a batch cannot be formed.
IDENTITY_SAMPLERS = ("NaiveIdentitySampler", "BalancedIdentitySampler", "SetReWeightSampler",
                     "StrictIdentitySampler")


def _folder_of(data, split: str) -> str:
    return getattr(data, f"{split}_dir", None) or getattr(data, "dataset_dir", "?")


def check_batches_possible(cfg, items: Sequence) -> None:
    """Refuse, before training, a batch the configured sampler could never form (for any sampler)."""
    sampler = cfg.DATALOADER.SAMPLER_TRAIN
    total, k = cfg.SOLVER.IMS_PER_BATCH, cfg.DATALOADER.NUM_INSTANCE
    world = comm.get_world_size()
    if total < 1 or total % world:
        raise ValueError(f"SOLVER.IMS_PER_BATCH ({total}) must be a positive multiple of the "
                         f"number of processes ({world})")
    if sampler not in IDENTITY_SAMPLERS:
        return  # image-level samplers repeat the set: any non-empty training set forms batches
    per_process = total // world
    if k < 1 or per_process % k:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH ({total}, {per_process} per process) must be a multiple of "
            f"DATALOADER.NUM_INSTANCE ({k}): {sampler} builds batches of identities x "
            f"NUM_INSTANCE images and would never complete one")
    counts = Counter(item[1] for item in items)
    # fast-reid's samplers split one global batch over the processes; the strict one draws a
    # batch per process from all identities
    needed = (per_process if sampler == "StrictIdentitySampler" else total) // k
    usable = sum(1 for n in counts.values() if n >= k) if sampler == "StrictIdentitySampler" \
        else len(counts)
    if usable < needed:
        condition = f" with >= {k} images" if sampler == "StrictIdentitySampler" else ""
        raise ValueError(
            f"{sampler} needs SOLVER.IMS_PER_BATCH / DATALOADER.NUM_INSTANCE = "
            f"{total if needed * k == total else per_process} / {k} = {needed} identities{condition} per batch, but the training set "
            f"({', '.join(cfg.DATASETS.NAMES)}) has {usable} ({len(counts)} identities, "
            f"{len(items)} images). Lower SOLVER.IMS_PER_BATCH or DATALOADER.NUM_INSTANCE.")


def build_train_loader(cfg):
    items = []
    for name in cfg.DATASETS.NAMES:
        data = build_dataset(cfg, name, combineall=cfg.DATASETS.COMBINEALL)
        if not data.train:
            raise ValueError(f"dataset '{name}' has no training images: {_folder_of(data, 'train')} "
                             "holds no image fast-reid's loader reads (*.jpg)")
        if comm.is_main_process():
            data.show_train()
        items.extend(data.train)
    check_batches_possible(cfg, items)
    train_set = CommDataset(items, build_transforms(cfg, is_train=True), relabel=True)
    sampler = None
    if cfg.DATALOADER.SAMPLER_TRAIN == "StrictIdentitySampler":
        sampler = StrictIdentitySampler(train_set.img_items,
                                        cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size(),
                                        cfg.DATALOADER.NUM_INSTANCE)
    with batches_on(cfg.MODEL.DEVICE):
        return build_reid_train_loader(cfg, train_set=train_set, sampler=sampler)


def build_test_loader(cfg, dataset_name: str) -> Tuple[object, int]:
    data = build_dataset(cfg, dataset_name)
    for split, images in (("query", data.query), ("gallery", data.gallery)):
        if not images:
            raise ValueError(f"dataset '{dataset_name}' has no {split} images: "
                             f"{_folder_of(data, split)} holds no image fast-reid's loader reads")
    if comm.is_main_process():
        data.show_test()
    test_set = CommDataset(data.query + data.gallery, build_transforms(cfg, is_train=False),
                           relabel=False)
    with batches_on(cfg.MODEL.DEVICE):
        loader, num_query = build_reid_test_loader(
            test_set=test_set, test_batch_size=cfg.TEST.IMS_PER_BATCH,
            num_query=len(data.query), num_workers=cfg.DATALOADER.NUM_WORKERS)
    return loader, num_query
