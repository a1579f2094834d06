"""Synthetic Market-1501-format data: determinism, split rules, loaders, safe (re)generation."""
import adaptive_l2  # noqa: F401  (applies the fast-reid compatibility patches first)

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest
from fastreid.data.datasets import DATASET_REGISTRY, Market1501
from fastreid.evaluation.rank import evaluate_rank
from PIL import Image

from adaptive_l2.data import SyntheticReID, generate_synthetic_market
from adaptive_l2.data import synthetic
from adaptive_l2.data.synthetic import dataset_folder_name

SMALL = dict(num_train_ids=4, num_test_ids=5, num_distractors=6, num_cameras=3, images_per_id=4)
SMALL_IMAGES = 4 * 4 + 5 * 4 + 6
SPLITS = ("bounding_box_train", "query", "bounding_box_test")
NAME = re.compile(r"^(\d{4})_c([1-6])s1_(\d{6})_00\.jpg$")


def _digest(folder: Path) -> Dict[str, str]:
    """sha256 of every file under ``folder``, by relative path."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*")) if path.is_file()
    }


def _parse(folder: Path, split: str) -> List[Tuple[int, int]]:
    """(pid, camera) of every image in a split, checking the Market-1501 file name format."""
    out = []
    for name in sorted(os.listdir(folder / split)):
        match = NAME.match(name)
        assert match, f"bad file name {split}/{name}"
        out.append((int(match.group(1)), int(match.group(2))))
    return out


def _stripe_histograms(path: str, stripes: int = 6, bins: int = 4) -> np.ndarray:
    """Hand-crafted re-id feature: RGB histograms of horizontal stripes of the central half."""
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.int64)
    width = rgb.shape[1]
    q = rgb[:, width // 4: 3 * width // 4] * bins // 256
    code = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]
    hist = [np.bincount(band.ravel(), minlength=bins ** 3)
            for band in np.array_split(code, stripes)]
    feature = np.sqrt(np.concatenate(hist).astype(np.float64))
    return feature / np.linalg.norm(feature)


@pytest.fixture(scope="module")
def default_dataset(tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, float]:
    """The default-size dataset and the seconds it took to generate."""
    folder = tmp_path_factory.mktemp("default") / "SyntheticReID"
    start = time.perf_counter()
    generate_synthetic_market(str(folder))
    return folder, time.perf_counter() - start


def test_default_size_generates_in_under_30_seconds(default_dataset: Tuple[Path, float]) -> None:
    folder, seconds = default_dataset
    assert seconds < 30.0, f"default-size generation took {seconds:.1f} s"
    counts = {split: len(os.listdir(folder / split)) for split in SPLITS}
    assert counts["bounding_box_train"] == 64 * 8
    assert counts["query"] + counts["bounding_box_test"] == 64 * 8 + 100
    marker = json.loads((folder / "generation.json").read_text())
    assert marker["counts"] == counts
    assert marker["params"]["seed"] == 0 and marker["format_version"] == synthetic.FORMAT_VERSION


def test_colour_histogram_baseline_is_far_above_chance_and_far_below_perfect(
        default_dataset: Tuple[Path, float]) -> None:
    folder, _ = default_dataset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Market1501 warns about the folder layout
        data = Market1501(root=str(folder))
    qf = np.stack([_stripe_histograms(p) for p, _, _ in data.query])
    gf = np.stack([_stripe_histograms(p) for p, _, _ in data.gallery])
    cmc, all_ap, _ = evaluate_rank(
        1.0 - qf @ gf.T,
        np.array([pid for _, pid, _ in data.query]), np.array([pid for _, pid, _ in data.gallery]),
        np.array([cam for _, _, cam in data.query]), np.array([cam for _, _, cam in data.gallery]),
        max_rank=10)
    rank1, mean_ap = float(cmc[0]), float(np.mean(all_ap))
    chance = 1.0 / 64
    assert 10 * chance < rank1 < 0.6, f"Rank-1 {rank1:.3f}"
    assert 5 * chance < mean_ap < 0.6, f"mAP {mean_ap:.3f}"


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    first = _digest(Path(generate_synthetic_market(str(tmp_path / "a"), seed=3, **SMALL)))
    second = _digest(Path(generate_synthetic_market(str(tmp_path / "b"), seed=3, **SMALL)))
    assert len(first) == SMALL_IMAGES + 1  # + generation.json
    assert first == second


def test_different_seed_gives_different_images(tmp_path: Path) -> None:
    first = _digest(Path(generate_synthetic_market(str(tmp_path / "a"), seed=0, **SMALL)))
    second = _digest(Path(generate_synthetic_market(str(tmp_path / "b"), seed=1, **SMALL)))
    images = lambda digest: {h for name, h in digest.items() if name.endswith(".jpg")}  # noqa: E731
    assert len(images(first)) == len(images(second)) == SMALL_IMAGES
    assert not images(first) & images(second)


def test_train_test_ids_disjoint_and_every_query_has_cross_camera_gallery_match(
        tmp_path: Path) -> None:
    folder = Path(generate_synthetic_market(
        str(tmp_path / "d"), num_train_ids=10, num_test_ids=12, num_distractors=5, num_cameras=6,
        images_per_id=8))
    train, query, gallery = (_parse(folder, split) for split in SPLITS)
    train_ids = {pid for pid, _ in train}
    query_ids = {pid for pid, _ in query}
    gallery_ids = {pid for pid, _ in gallery if pid != 0}
    assert len(train) == 80 and len(train_ids) == 10
    assert len(gallery_ids) == 12 and len(query) + len(gallery) == 12 * 8 + 5
    assert sum(pid == 0 for pid, _ in gallery) == 5
    assert all(1 <= pid <= 1501 for pid in train_ids | gallery_ids)
    assert not train_ids & (query_ids | gallery_ids)
    assert query_ids <= gallery_ids
    assert len(set(query)) == len(query), "at most one query per identity and camera"
    for pid, cam in query:
        assert any(g_pid == pid and g_cam != cam for g_pid, g_cam in gallery), (pid, cam)


def test_stock_market1501_loader_reads_generated_folder(tmp_path: Path) -> None:
    folder = generate_synthetic_market(str(tmp_path / "m"), **SMALL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = Market1501(root=folder)
    marker = json.loads(Path(folder, "generation.json").read_text())
    assert len(data.train) == 16 and data.get_num_pids(data.train) == 4
    assert len(data.query) == marker["counts"]["query"] > 0
    assert len(data.query) + len(data.gallery) == 5 * 4 + 6
    assert sum(pid == 0 for _, pid, _ in data.gallery) == 6
    assert {cam for _, _, cam in data.gallery} <= {0, 1, 2}


def test_synthetic_reid_loads_from_registry_in_sorted_order(tmp_path: Path) -> None:
    data = DATASET_REGISTRY.get("SyntheticReID")(root=str(tmp_path), seed=0, **SMALL)
    assert isinstance(data, SyntheticReID)
    folder = tmp_path / dataset_folder_name(seed=0, **SMALL)  # other sizes, other folder
    assert (folder / "generation.json").is_file()
    assert len(data.train) == 16 and data.get_num_pids(data.train) == 4
    assert all(isinstance(pid, str) and pid.startswith("synthetic_") for _, pid, _ in data.train)
    assert {cam for _, _, cam in data.train} <= {"synthetic_0", "synthetic_1", "synthetic_2"}
    assert all(isinstance(pid, int) for _, pid, _ in data.query + data.gallery)
    for items in (data.train, data.query, data.gallery):
        paths = [path for path, _, _ in items]
        assert paths == sorted(paths)
    assert len(data.query) + len(data.gallery) == 5 * 4 + 6

    marker = folder / "generation.json"
    stamp = marker.stat().st_mtime_ns
    again = SyntheticReID(root=str(tmp_path), seed=0, **SMALL)
    assert marker.stat().st_mtime_ns == stamp, "a matching dataset must not be regenerated"
    assert again.train == data.train and again.gallery == data.gallery


def test_existing_folder_without_marker_raises_and_is_left_untouched(tmp_path: Path) -> None:
    folder = tmp_path / "SyntheticReID"
    (folder / "bounding_box_train").mkdir(parents=True)
    (folder / "bounding_box_train" / "0001_c1s1_000001_00.jpg").write_bytes(b"user data")
    before = _digest(folder)
    with pytest.raises(RuntimeError, match=r"SyntheticReID exists but has no generation\.json"):
        generate_synthetic_market(str(folder), **SMALL)
    assert _digest(folder) == before
    assert os.listdir(tmp_path) == ["SyntheticReID"]  # no temporary folder left either


def test_matching_marker_is_reused_and_other_settings_regenerate(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "d"
    generate_synthetic_market(str(folder), seed=0, **SMALL)
    first = _digest(folder)
    stamp = (folder / "generation.json").stat().st_mtime_ns
    generate_synthetic_market(str(folder), seed=0, **SMALL)
    assert (folder / "generation.json").stat().st_mtime_ns == stamp

    with caplog.at_level(logging.WARNING, logger="adaptive_l2.data.synthetic"):
        generate_synthetic_market(str(folder), seed=1, **SMALL)
    assert "generated with other settings" in caplog.text
    assert json.loads((folder / "generation.json").read_text())["params"]["seed"] == 1
    assert _digest(folder) != first
    assert os.listdir(tmp_path) == ["d"]


def test_failed_generation_leaves_nothing_and_a_retry_completes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    render = synthetic.layout.render_person_image  # what writes every image
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt("simulated interruption")
        return render(*args, **kwargs)

    monkeypatch.setattr(synthetic.layout, "render_person_image", failing)
    folder = tmp_path / "SyntheticReID"
    with pytest.raises(KeyboardInterrupt):
        generate_synthetic_market(str(folder), **SMALL)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    generate_synthetic_market(str(folder), **SMALL)
    assert len(_digest(folder)) == SMALL_IMAGES + 1


def test_killed_generation_leaves_only_a_temp_folder_that_the_next_run_removes(
        tmp_path: Path) -> None:
    folder = tmp_path / "SyntheticReID"
    code = ("import sys; from adaptive_l2.data.synthetic import generate_synthetic_market as g; "
            "g(sys.argv[1], num_train_ids=300, num_test_ids=300, images_per_id=8)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        partial = []
        while time.monotonic() < deadline and proc.poll() is None:
            partial = [p for p in tmp_path.iterdir()
                       if p.name.startswith(".SyntheticReID.partial-")]
            if partial and len(list(partial[0].rglob("*.jpg"))) >= 20:
                break
            time.sleep(0.05)
        assert partial and proc.poll() is None, "the generation finished or never started"
        proc.kill()
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not folder.exists(), "a killed generation must not leave a folder that looks complete"
    # its lock is left too: stale (its process is gone), the next run takes it over
    assert sorted(p.name for p in tmp_path.iterdir()) == [".SyntheticReID.lock", partial[0].name]

    generate_synthetic_market(str(folder), **SMALL)
    assert os.listdir(tmp_path) == ["SyntheticReID"]
    assert len(_digest(folder)) == SMALL_IMAGES + 1


@pytest.mark.parametrize("bad, message", [
    (dict(images_per_id=2), "images_per_id"),
    (dict(num_train_ids=1000, num_test_ids=600), "1501"),
    (dict(num_cameras=7), "num_cameras"),
])
def test_invalid_sizes_raise_naming_the_value(
        tmp_path: Path, bad: Dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate_synthetic_market(str(tmp_path / "d"), **{**SMALL, **bad})
    assert os.listdir(tmp_path) == []
