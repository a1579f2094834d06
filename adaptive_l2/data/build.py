"""Dataset and loader construction with the dataset root taken from the config.

fast-reid reads its dataset root once, from $FASTREID_DATASETS at import; here it comes from
`DATASETS.ROOT`, the embedded synthetic dataset gets its sizes from `DATASETS.SYNTHETIC`, and a
missing real dataset is an error that says where its files must go.
"""
from __future__ import annotations

import os
from typing import Tuple

from fastreid.data.build import build_reid_test_loader, build_reid_train_loader
from fastreid.data.common import CommDataset
from fastreid.data.datasets import DATASET_REGISTRY
from fastreid.utils import comm

from adaptive_l2.compat import batches_on
from adaptive_l2.data.samplers import ChunkedIdentitySampler, StrictIdentitySampler
from adaptive_l2.data.transforms import build_transforms

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


def build_train_loader(cfg):
    items = []
    for name in cfg.DATASETS.NAMES:
        data = build_dataset(cfg, name, combineall=cfg.DATASETS.COMBINEALL)
        if comm.is_main_process():
            data.show_train()
        items.extend(data.train)
    train_set = CommDataset(items, build_transforms(cfg, is_train=True), relabel=True)
    sampler = None
    if cfg.DATALOADER.SAMPLER_TRAIN == "StrictIdentitySampler":
        sampler = StrictIdentitySampler(train_set.img_items,
                                        cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size(),
                                        cfg.DATALOADER.NUM_INSTANCE)
    elif cfg.DATALOADER.SAMPLER_TRAIN == "ChunkedIdentitySampler":
        # global batches of SOLVER.IMS_PER_BATCH, the original Keras code's round-based draw
        sampler = ChunkedIdentitySampler(train_set.img_items, cfg.SOLVER.IMS_PER_BATCH,
                                         cfg.DATALOADER.NUM_INSTANCE)
    with batches_on(cfg.MODEL.DEVICE):
        return build_reid_train_loader(cfg, train_set=train_set, sampler=sampler)


def build_test_loader(cfg, dataset_name: str) -> Tuple[object, int]:
    data = build_dataset(cfg, dataset_name)
    if comm.is_main_process():
        data.show_test()
    test_set = CommDataset(data.query + data.gallery, build_transforms(cfg, is_train=False),
                           relabel=False)
    with batches_on(cfg.MODEL.DEVICE):
        loader, num_query = build_reid_test_loader(
            test_set=test_set, test_batch_size=cfg.TEST.IMS_PER_BATCH,
            num_query=len(data.query), num_workers=cfg.DATALOADER.NUM_WORKERS)
    return loader, num_query
