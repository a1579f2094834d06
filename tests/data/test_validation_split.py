"""DATASETS.VALIDATION: identities held out of training form a query / gallery split."""
import os
from collections import defaultdict

import pytest
from conftest import TINY_VALIDATION, market_folder, tiny_cfg

from adaptive_l2.config import load_config
from adaptive_l2.data.validation import VALIDATION_SET, split_validation

MARKET = ["DATASETS.NAMES", '("Market1501",)', "DATASETS.TESTS", '("Market1501",)']


def _check_split(items, split, count):
    held = set(split.held_out)
    assert len(held) == count
    train_pids = {item[1] for item in split.train}
    assert not held & train_pids  # disjoint identities
    assert train_pids | held == {item[1] for item in items}
    assert len(split.train) + len(split.query) + len(split.gallery) == len(items)
    assert {path for path, _, _ in split.query}.isdisjoint(path for path, _, _ in split.gallery)
    # every query has a gallery image of its identity from another camera (a valid match)
    gallery_cameras = defaultdict(set)
    for _, pid, camid in split.gallery:
        gallery_cameras[pid].add(camid)
    for _, pid, camid in split.query:
        assert gallery_cameras[pid] - {camid}, (pid, camid)
    assert all(isinstance(pid, int) and isinstance(camid, int)
               for _, pid, camid in split.query + split.gallery)


def test_synthetic_split_is_disjoint_deterministic_and_seeded(dataset_root, tmp_path):
    from adaptive_l2.data.build import training_items, validation_split

    cfg = tiny_cfg(dataset_root, tmp_path, *TINY_VALIDATION)
    items = training_items(cfg, show=False)
    split = validation_split(cfg, items)
    _check_split(items, split, 4)
    # every held-out identity (6 images on up to 3 cameras, 2+ cameras each here) gives queries
    assert not split.gallery_only and {pid for _, pid, _ in split.query} == {0, 1, 2, 3}
    reordered = validation_split(cfg, list(reversed(items)))  # the draw ignores the items' order
    assert reordered._replace(train=split.train) == split
    assert reordered.train == list(reversed(split.train))  # the training order is kept
    other = split_validation(items, identities=4, seed=1)
    assert other.held_out != split.held_out or other.query != split.query
    assert split_validation(items, fraction=0.4, seed=0) == split  # 0.4 x 10 identities


def test_a_one_camera_identity_is_gallery_only_and_all_of_them_is_refused():
    items = [(f"p{pid}_{shot}.jpg", f"d_{pid}", "d_0" if pid < 3 else f"d_{shot % 2}")
             for pid in range(6) for shot in range(3)]
    split = split_validation(items, identities=5, seed=0)
    _check_split(items, split, 5)
    single = {pid for pid in split.held_out if int(pid[2:]) < 3}
    assert set(split.gallery_only) == single and single
    with pytest.raises(ValueError, match="DATASETS.VALIDATION: none of the 2 held-out identities "
                                         "was seen by two cameras"):
        split_validation(items[:9], identities=2, seed=0)
    with pytest.raises(ValueError, match="DATASETS.VALIDATION: the split's gallery holds 4 images "
                                         r"\(2 held-out identities, 2 queries\).* Rank-10"):
        split_validation(items[9:], identities=2, seed=0)


def test_market_folder_trains_without_the_held_out_identities(tmp_path):
    from adaptive_l2.data.build import build_test_loader, build_train_loader

    root = market_folder(tmp_path / "data", identities=10, cameras=3, images_per_id=6)
    cfg = tiny_cfg(root, tmp_path / "out", *MARKET, "DATASETS.VALIDATION.IDENTITIES", "4",
                   "DATASETS.VALIDATION.SEED", "5")
    train_set = build_train_loader(cfg).dataset
    assert train_set.num_classes == 6
    assert sorted(set(train_set.pid_dict.values())) == list(range(6))  # relabelled contiguously
    held = {f"market1501_{pid}" for pid in range(1, 11)} - set(train_set.pid_dict)
    assert len(held) == 4
    loader, num_query = build_test_loader(cfg, VALIDATION_SET)
    assert num_query == 4 * 3  # one query per camera, each camera keeps 1 gallery image
    assert len(loader.dataset) == 4 * 6
    held_prefixes = {f"{int(pid.split('_')[1]):04d}_" for pid in held}
    assert not any(os.path.basename(path)[:5] in held_prefixes
                   for path, _, _ in train_set.img_items)


@pytest.mark.parametrize("opts, message", [
    (["DATASETS.VALIDATION.FRACTION", "1.5"], r"DATASETS.VALIDATION.FRACTION must be in \[0, 1\)"),
    (["DATASETS.VALIDATION.IDENTITIES", "-2"], "DATASETS.VALIDATION.IDENTITIES must be >= 0"),
    (["DATASETS.VALIDATION.IDENTITIES", "2", "DATASETS.VALIDATION.FRACTION", "0.1"],
     "set only one of DATASETS.VALIDATION.IDENTITIES"),
])
def test_bad_validation_values_name_the_key(opts, message):
    from conftest import SYNTHETIC_BASE

    with pytest.raises(ValueError, match=message):
        load_config(SYNTHETIC_BASE, opts)


def test_holding_out_every_identity_is_refused(dataset_root, tmp_path):
    from adaptive_l2.data.build import build_train_loader

    with pytest.raises(ValueError, match="DATASETS.VALIDATION.IDENTITIES holds out 8 of the 8 "
                                         "training identities"):
        build_train_loader(tiny_cfg(dataset_root, tmp_path, "DATASETS.VALIDATION.IDENTITIES", "8"))
    with pytest.raises(ValueError, match="DATASETS.VALIDATION: the split's gallery holds"):
        build_train_loader(tiny_cfg(dataset_root, tmp_path, "DATASETS.VALIDATION.IDENTITIES", "1"))
    with pytest.raises(ValueError, match="DATASETS.VALIDATION.FRACTION 0.01 of 8 training "
                                         "identities rounds to 0"):
        build_train_loader(tiny_cfg(dataset_root, tmp_path, "DATASETS.VALIDATION.FRACTION", "0.01"))
