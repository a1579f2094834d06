"""Shared fixtures: a tiny synthetic dataset and configs that train in seconds on a CPU."""
import json
import os
import subprocess
import sys

import pytest

import adaptive_l2  # noqa: F401  (applies the fast-reid patches before any fastreid import)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")
SYNTHETIC_BASE = os.path.join(REPO, "configs", "Synthetic", "Base-Synthetic.yml")

# Small enough that a whole train + evaluate run takes seconds.
TINY_DATASET = [
    "DATASETS.SYNTHETIC.NUM_TRAIN_IDS", "8", "DATASETS.SYNTHETIC.NUM_TEST_IDS", "6",
    "DATASETS.SYNTHETIC.NUM_DISTRACTORS", "6", "DATASETS.SYNTHETIC.IMAGES_PER_ID", "4",
    "DATASETS.SYNTHETIC.NUM_CAMERAS", "3",
    "DATASETS.SYNTHETIC.HEIGHT", "64", "DATASETS.SYNTHETIC.WIDTH", "32",
]
TINY_TRAINING = [
    "INPUT.SIZE_TRAIN", "[64,32]", "INPUT.SIZE_TEST", "[64,32]", "INPUT.PADDING.SIZE", "2",
    "SOLVER.IMS_PER_BATCH", "16", "SOLVER.ITERS_PER_EPOCH", "2", "SOLVER.MAX_EPOCH", "2",
    "SOLVER.WARMUP_ITERS", "2", "SOLVER.STEPS", "[1]", "SOLVER.CHECKPOINT_PERIOD", "1",
    "SOLVER.LOG_PERIOD", "1", "TEST.EVAL_PERIOD", "2", "TEST.IMS_PER_BATCH", "32",
    "DATALOADER.NUM_WORKERS", "0",
]
# A validation split fast-reid's evaluator accepts (10+ gallery images): 4 of 10 identities held out.
TINY_VALIDATION = ["DATASETS.SYNTHETIC.NUM_TRAIN_IDS", "10", "DATASETS.SYNTHETIC.IMAGES_PER_ID", "6",
                   "DATASETS.VALIDATION.IDENTITIES", "4"]


@pytest.fixture(scope="session")
def dataset_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("datasets"))


def tiny_opts(dataset_root, output_dir, *extra):
    return [*TINY_DATASET, *TINY_TRAINING, "DATASETS.ROOT", dataset_root,
            "OUTPUT_DIR", str(output_dir), *extra]


def tiny_cfg(dataset_root, output_dir, *extra, config_file=SYNTHETIC_BASE):
    from adaptive_l2.config import load_config

    return load_config(config_file, tiny_opts(dataset_root, output_dir, *extra))


def run_train_net(args, timeout=300, check=True):
    """tools/train_net.py in a fresh process, as a user runs it."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, TRAIN_NET, *args], capture_output=True, text=True,
                            timeout=timeout, env=env, cwd=REPO)
    if check and result.returncode != 0:
        raise AssertionError(f"train_net failed ({result.returncode}):\n{result.stderr[-6000:]}")
    return result


def market_folder(root, identities, bad_name="", cameras=2, images_per_id=4):
    """A Market-1501 folder whose train split has `identities` x `images_per_id` images (tiny
    JPEGs, cameras in turn); returns the dataset root to give as DATASETS.ROOT."""
    from PIL import Image

    base = root / "Market-1501-v15.09.15"
    for split in ("bounding_box_train", "query", "bounding_box_test"):
        (base / split).mkdir(parents=True, exist_ok=True)
    for pid in range(1, identities + 1):
        for shot in range(images_per_id):
            Image.new("RGB", (16, 32), (pid * 40 % 256, 90, 30)).save(
                base / "bounding_box_train" / f"{pid:04d}_c{shot % cameras + 1}s1_{shot:06d}_00.jpg")
    if bad_name:
        Image.new("RGB", (16, 32)).save(base / "bounding_box_train" / bad_name)
    return str(root)


def read_results(output_dir):
    with open(os.path.join(output_dir, "final_results.json")) as handle:
        return json.load(handle)


def read_losses(output_dir):
    losses = []
    with open(os.path.join(output_dir, "metrics.json")) as handle:
        for line in handle:
            record = json.loads(line)
            if "total_loss" in record:
                losses.append((record["iteration"], record["total_loss"]))
    return losses
