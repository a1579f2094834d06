"""The dataset's Market-1501 layout: which pid appears in which camera and split, the file name of
every image, and the rendering of all of them into a folder."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

from adaptive_l2.data.synthetic.appearance import make_identities
from adaptive_l2.data.synthetic.render import render_distractor, render_person_image
from adaptive_l2.data.synthetic.scene import SUPERSAMPLE, make_camera, make_campus
from adaptive_l2.data.synthetic.streams import (STREAM_DISTRACTOR, STREAM_IMAGE, STREAM_LAYOUT,
                                                random_stream)


TRAIN_DIR = "bounding_box_train"
QUERY_DIR = "query"
GALLERY_DIR = "bounding_box_test"
JPEG_QUALITY = 90
MAX_PID = 1501  # fast-reid's Market1501 loader asserts 0 <= pid <= 1501
MAX_CAMERAS = 6  # ... and 1 <= camera <= 6
DISTRACTOR_PID = 0  # Market-1501's "background / distractor" id, kept in the gallery
_MAX_CAMERAS_PER_ID = 4


@dataclass(frozen=True)
class _Shot:
    """One image to write: who (identity index or None for a distractor), where, and its name."""

    folder: str
    pid: int
    camera: int  # 1-based
    frame: int
    identity: Optional[int]
    stream: int
    index: int

    @property
    def filename(self) -> str:
        return f"{self.pid:04d}_c{self.camera}s1_{self.frame:06d}_00.jpg"


def _layout(params: Dict[str, object]) -> List[_Shot]:
    """Which pid appears in which camera and split, and the file name of every image."""
    seed = int(params["seed"])
    n_train, n_test = int(params["num_train_ids"]), int(params["num_test_ids"])
    n_cams, per_id = int(params["num_cameras"]), int(params["images_per_id"])
    rng = random_stream(seed, STREAM_LAYOUT)
    pids = rng.choice(np.arange(1, MAX_PID + 1), size=n_train + n_test, replace=False)
    train_pids, test_pids = sorted(pids[:n_train].tolist()), sorted(pids[n_train:].tolist())
    frames = rng.integers(0, 1000, n_cams + 1)

    def next_frame(cam: int) -> int:
        frames[cam] += int(rng.integers(1, 120))
        return int(frames[cam])

    shots: List[_Shot] = []
    max_cams = min(n_cams, per_id - 1, _MAX_CAMERAS_PER_ID)
    for k, pid in enumerate(train_pids + test_pids):
        is_test = k >= n_train
        k_cams = int(rng.integers(2, max_cams + 1))
        cams = sorted((rng.choice(n_cams, size=k_cams, replace=False) + 1).tolist())
        counts = 1 + rng.multinomial(per_id - k_cams, np.full(k_cams, 1.0 / k_cams))
        for cam, count in zip(cams, counts):
            # One query per camera that keeps at least one gallery image of its own, so every
            # query has a gallery match in another camera.
            query_at = int(rng.integers(count)) if is_test and count >= 2 else -1
            for j in range(count):
                folder = TRAIN_DIR if not is_test else (QUERY_DIR if j == query_at else GALLERY_DIR)
                shots.append(_Shot(folder, pid, cam, next_frame(cam), k, STREAM_IMAGE, len(shots)))
    for j in range(int(params["num_distractors"])):
        cam = int(rng.integers(1, n_cams + 1))
        shots.append(_Shot(GALLERY_DIR, DISTRACTOR_PID, cam, next_frame(cam), None,
                           STREAM_DISTRACTOR, j))
    return shots


def write_images(folder: str, params: Dict[str, object]) -> Dict[str, int]:
    """Render and save every image of the dataset into ``folder``; returns images per split."""
    seed, difficulty = int(params["seed"]), float(params["difficulty"])
    out_h, out_w = int(params["height"]), int(params["width"])
    n_train = int(params["num_train_ids"])
    people = make_identities(seed, n_train, 0) + make_identities(
        seed, int(params["num_test_ids"]), n_train)
    h, w = out_h * SUPERSAMPLE, out_w * SUPERSAMPLE
    campus = make_campus(seed, int(h * 1.25), w * 12)
    cameras = [make_camera(seed, c, campus, w * 5, difficulty)
               for c in range(int(params["num_cameras"]))]
    counts = {TRAIN_DIR: 0, QUERY_DIR: 0, GALLERY_DIR: 0}
    for split in counts:
        os.makedirs(os.path.join(folder, split))
    for shot in _layout(params):
        rng = random_stream(seed, shot.stream, shot.index)
        camera = cameras[shot.camera - 1]
        if shot.identity is None:
            image = render_distractor(rng, camera, out_h, out_w, difficulty)
        else:
            image = render_person_image(rng, people[shot.identity], camera, out_h, out_w,
                                         difficulty)
        path = os.path.join(folder, shot.folder, shot.filename)
        if os.path.exists(path):
            raise RuntimeError(f"synthetic layout produced a duplicate file name: {path}")
        image.save(path, format="JPEG", quality=JPEG_QUALITY)
        counts[shot.folder] += 1
    return counts
