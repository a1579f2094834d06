"""A validation split carved from the training identities, for any dataset.

Hyper-parameters chosen on the test set are chosen for the test set: the original code kept the
checkpoint of its best test evaluation. With `DATASETS.VALIDATION.IDENTITIES` (a count) or
`DATASETS.VALIDATION.FRACTION` (of the training identities), a seeded draw of identities leaves
the training set entirely (the remaining ones are relabelled contiguously by fast-reid's
CommDataset, as always) and becomes a query / gallery split; evaluation during training then uses
it instead of `DATASETS.TESTS`. It works on the lists of (path, pid, camid) every fast-reid dataset
object holds, so every registered dataset (and several at once) gets it the same way.

Query / gallery rule, per held-out identity: one (seeded) image per camera goes to the query set,
except where the gallery would then hold no image of the identity from another camera than a
query's (fast-reid's evaluator ignores same-camera matches): see `query_cameras_of`; everything
else is gallery. An identity seen by one camera only cannot be a query: its images stay in the
gallery as distractors.
"""
from __future__ import annotations

import logging
import random
from collections import defaultdict
from typing import Dict, Hashable, List, NamedTuple, Sequence, Tuple

logger = logging.getLogger(__name__)

# The name evaluation results carry when they come from the validation split.
VALIDATION_SET = "validation"

# fast-reid's evaluator indexes Rank-10 of the CMC curve, whose length is the gallery's size
MIN_GALLERY = 10

Item = Tuple[str, Hashable, Hashable]


class ValidationSplit(NamedTuple):
    train: List[Item]  # training items without the held-out identities (pids as given)
    query: List[Tuple[str, int, int]]  # held-out images, pids and cameras as ints for the evaluator
    gallery: List[Tuple[str, int, int]]
    held_out: List[Hashable]  # the held-out training pids
    gallery_only: List[Hashable]  # held-out pids that cannot be queried (one camera)


def held_out_count(identities: int, fraction: float, num_ids: int) -> int:
    """The number of identities to hold out, from the config's count or fraction (checked)."""
    if identities < 0:
        raise ValueError(f"DATASETS.VALIDATION.IDENTITIES must be >= 0 (0 = off), got {identities}")
    if not 0 <= fraction < 1:
        raise ValueError(f"DATASETS.VALIDATION.FRACTION must be in [0, 1) (0 = off), got {fraction}")
    if identities and fraction:
        raise ValueError("set only one of DATASETS.VALIDATION.IDENTITIES "
                         f"({identities}) and DATASETS.VALIDATION.FRACTION ({fraction})")
    count = identities if identities else int(round(fraction * num_ids))
    if fraction and count == 0:
        raise ValueError(f"DATASETS.VALIDATION.FRACTION {fraction} of {num_ids} training "
                         "identities rounds to 0 identities: raise it or set 0 (off)")
    if count >= num_ids:
        key = "IDENTITIES" if identities else "FRACTION"
        raise ValueError(f"DATASETS.VALIDATION.{key} holds out {count} of the {num_ids} training "
                         "identities: at least one must stay for training")
    return count


def validation_enabled(cfg) -> bool:
    """Whether the config carves a validation split (and evaluates on it during training)."""
    validation = cfg.DATASETS.VALIDATION
    return validation.IDENTITIES != 0 or validation.FRACTION != 0


def query_cameras_of(images_per_camera: Dict[Hashable, int]) -> List[Hashable]:
    """The cameras (in the given order) that give one query image of an identity, such that every
    query keeps a gallery image of the identity from another camera: all of them when two cameras
    hold 2+ images; otherwise all but the first one-image camera, which stays in the gallery; none
    for an identity seen by one camera."""
    cameras = list(images_per_camera)
    if len(cameras) < 2:
        return []
    several = [camid for camid in cameras if images_per_camera[camid] >= 2]
    if len(several) >= 2:
        return cameras
    kept = next(camid for camid in cameras if images_per_camera[camid] == 1)
    return [camid for camid in cameras if camid != kept]


def split_validation(items: Sequence[Item], identities: int = 0, fraction: float = 0.0,
                     seed: int = 0) -> ValidationSplit:
    """Hold out identities of `items` (a training list) as a query / gallery split.

    The draw depends only on the seed and the set of pids (sorted by their text), not on the
    order of `items`. The caller's list is not changed."""
    by_pid: Dict[Hashable, List[Item]] = defaultdict(list)
    for item in items:
        by_pid[item[1]].append(item)
    pids = sorted(by_pid, key=str)
    count = held_out_count(identities, fraction, len(pids))
    if count == 0:
        return ValidationSplit(list(items), [], [], [], [])
    rng = random.Random(seed)
    held_out = sorted(rng.sample(pids, count), key=str)
    held = set(held_out)
    train = [item for item in items if item[1] not in held]
    pid_index = {pid: index for index, pid in enumerate(held_out)}
    cameras = sorted({item[2] for pid in held_out for item in by_pid[pid]}, key=str)
    camera_index = {camid: index for index, camid in enumerate(cameras)}

    query: List[Tuple[str, int, int]] = []
    gallery: List[Tuple[str, int, int]] = []
    gallery_only = []
    for pid in held_out:
        per_camera: Dict[Hashable, List[Item]] = defaultdict(list)
        for item in sorted(by_pid[pid], key=lambda entry: entry[0]):
            per_camera[item[2]].append(item)
        cameras_of_pid = sorted(per_camera, key=str)
        in_gallery = {camid: list(per_camera[camid]) for camid in cameras_of_pid}
        query_cameras = query_cameras_of({camid: len(per_camera[camid]) for camid in cameras_of_pid})
        queried = [in_gallery[camid].pop(rng.randrange(len(in_gallery[camid])))
                   for camid in query_cameras]
        if not queried:
            gallery_only.append(pid)
        for path, _, camid in queried:
            query.append((path, pid_index[pid], camera_index[camid]))
        for camid in sorted(in_gallery, key=str):
            gallery.extend((path, pid_index[pid], camera_index[camid])
                           for path, _, _ in in_gallery[camid])
    if not query:
        raise ValueError(
            f"DATASETS.VALIDATION: none of the {count} held-out identities was seen by two cameras, "
            "so none can be a query (fast-reid's evaluator ignores same-camera matches); hold out "
            "more identities or change DATASETS.VALIDATION.SEED")
    if len(gallery) < MIN_GALLERY:
        raise ValueError(
            f"DATASETS.VALIDATION: the split's gallery holds {len(gallery)} images ({count} "
            f"held-out identities, {len(query)} queries); fast-reid's evaluator reports Rank-10 "
            f"and fails below {MIN_GALLERY} gallery images: hold out more identities")
    if gallery_only:
        logger.info("validation split: %d held-out identities seen by one camera only stay in the "
                    "gallery (they cannot be queried): %s", len(gallery_only), gallery_only)
    return ValidationSplit(train, query, gallery, held_out, gallery_only)
