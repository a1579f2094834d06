"""fast-reid dataset for the project's synthetic Market-1501-format data.

Registered in fast-reid's ``DATASET_REGISTRY`` as ``SyntheticReID``, so a config can name it in
``DATASETS.NAMES`` / ``DATASETS.TESTS`` like any real dataset. The data are generated on first use
(by the main process only) under ``<root>/SyntheticReID`` for the default sizes and under
``<root>/SyntheticReID-<settings>`` for others.
"""
from __future__ import annotations

import glob
import os
import re
from typing import List, Tuple, Union

from fastreid.data.datasets import DATASET_REGISTRY
from fastreid.data.datasets.bases import ImageDataset
from fastreid.utils import comm

from adaptive_l2.data.synthetic import (
    GALLERY_DIR,
    MAX_CAMERAS,
    MAX_PID,
    QUERY_DIR,
    TRAIN_DIR,
    dataset_folder_name,
    generate_synthetic_market,
)

__all__ = ["SyntheticReID"]

_NAME_PATTERN = re.compile(r"^([-\d]+)_c(\d)")

Item = Tuple[str, Union[int, str], Union[int, str]]


@DATASET_REGISTRY.register()
class SyntheticReID(ImageDataset):
    """Seeded synthetic person re-id data in Market-1501 layout (``adaptive_l2.data.synthetic``).

    Reads the folders like fast-reid's ``Market1501`` (train pids / camids prefixed with
    ``dataset_name``, 0-based cameras, pid 0 kept in the gallery as a distractor), but in sorted
    file order, because glob order depends on the filesystem and runs must be repeatable.
    """

    _junk_pids = [0, -1]
    dataset_dir = "SyntheticReID"
    dataset_name = "synthetic"

    def __init__(self, root: str = "datasets", seed: int = 0, num_train_ids: int = 64,
                 num_test_ids: int = 64, num_distractors: int = 100, num_cameras: int = 6,
                 images_per_id: int = 8, height: int = 128, width: int = 64,
                 difficulty: float = 1.0, **kwargs) -> None:
        self.root = root
        # other sizes, other folder: a run never regenerates the data another run reads
        self.dataset_dir = os.path.join(root, dataset_folder_name(
            self.dataset_dir, seed=seed, num_train_ids=num_train_ids, num_test_ids=num_test_ids,
            num_distractors=num_distractors, num_cameras=num_cameras, images_per_id=images_per_id,
            height=height, width=width, difficulty=difficulty))
        if comm.is_main_process():
            generate_synthetic_market(
                self.dataset_dir, seed=seed, num_train_ids=num_train_ids,
                num_test_ids=num_test_ids, num_distractors=num_distractors,
                num_cameras=num_cameras, images_per_id=images_per_id, height=height,
                width=width, difficulty=difficulty)
        comm.synchronize()  # the other ranks wait until the main process has written the data

        self.train_dir = os.path.join(self.dataset_dir, TRAIN_DIR)
        self.query_dir = os.path.join(self.dataset_dir, QUERY_DIR)
        self.gallery_dir = os.path.join(self.dataset_dir, GALLERY_DIR)
        self.check_before_run([self.dataset_dir, self.train_dir, self.query_dir, self.gallery_dir])

        train = self.process_dir(self.train_dir)
        query = self.process_dir(self.query_dir, is_train=False)
        gallery = self.process_dir(self.gallery_dir, is_train=False)
        super().__init__(train, query, gallery, **kwargs)

    def process_dir(self, dir_path: str, is_train: bool = True) -> List[Item]:
        """(path, pid, camid) of every JPEG in ``dir_path``, in file-name order."""
        data: List[Item] = []
        for img_path in sorted(glob.glob(os.path.join(dir_path, "*.jpg"))):
            match = _NAME_PATTERN.match(os.path.basename(img_path))
            if match is None:
                raise ValueError(f"{img_path}: not a Market-1501 file name (expected PPPP_cC...)")
            pid, camid = int(match.group(1)), int(match.group(2))
            if pid == -1:
                continue  # junk images are ignored, as in Market-1501
            if not (0 <= pid <= MAX_PID and 1 <= camid <= MAX_CAMERAS):
                raise ValueError(
                    f"{img_path}: pid {pid} or camera {camid} out of the Market-1501 range")
            camid -= 1  # 0-based cameras
            if is_train:
                name = self.dataset_name
                data.append((img_path, f"{name}_{pid}", f"{name}_{camid}"))
            else:
                data.append((img_path, pid, camid))
        return data
