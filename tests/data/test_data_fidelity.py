"""The original Keras code's data pipeline for the paper rows: the round-based P x K sampler,
its random erasing and its OpenCV bilinear resize, each checked against a statistic or a hand
computation written from the protocol (not from the implementation)."""
import glob
import os
from collections import Counter

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from conftest import REPO, SYNTHETIC_BASE, read_losses, run_train_net, tiny_cfg, tiny_opts
from fastreid.data.transforms import build_transforms as fastreid_transforms
from PIL import Image
from scipy.stats import ks_2samp

from adaptive_l2.config import load_config
from adaptive_l2.data.samplers import ChunkedIdentitySampler
from adaptive_l2.data.transforms import (CV2BilinearResize, KerasRandomErasing, build_transforms,
                                         resize_bilinear_half_pixel)
from adaptive_l2.trainer import Trainer

PAPER_DATA = ["DATALOADER.SAMPLER_TRAIN", "ChunkedIdentitySampler", "INPUT.REA.ENABLED", "True",
              "INPUT.REA.IMPL", "keras", "INPUT.RESIZE_IMPL", "cv2_bilinear"]


def identity_items(counts):
    """Dataset items (path, pid, camid) with counts[pid] images for each identity."""
    return [(f"img_{pid}_{i}", pid, 0) for pid, count in enumerate(counts) for i in range(count)]


def test_chunked_sampler_draws_identities_in_proportion_to_their_chunks():
    # 10 identities with 40 images (10 chunks of 4), 10 with 4 (1 chunk), 5 with 3 (never drawn)
    counts = [40] * 10 + [4] * 10 + [3] * 5
    items = identity_items(counts)
    sampler = ChunkedIdentitySampler(items, global_batch_size=8, num_instances=4, seed=0)
    draws, num_rounds = Counter(), 300
    rounds = sampler.rounds()
    for _ in range(num_rounds):
        for batch in next(rounds):
            draws.update(items[i][1] for i in batch[::4])
    big = np.mean([draws[pid] for pid in range(10)]) / num_rounds
    small = np.mean([draws[pid] for pid in range(10, 20)]) / num_rounds
    # a round uses every chunk but at most the last identity's leftovers: 10 and 1 per round
    assert 9.5 < big <= 10 and small == pytest.approx(1.0, abs=0.02)
    assert 9.5 < big / small < 10.3
    assert not any(draws[pid] for pid in range(20, 25))


def test_chunked_sampler_never_repeats_an_image_within_a_round_and_keeps_k_per_identity():
    counts = [2, 3, 4, 5, 6, 8, 4, 1, 7, 4, 13, 9]
    items = identity_items(counts)
    sampler = ChunkedIdentitySampler(items, global_batch_size=12, num_instances=4, seed=3)
    eligible = {pid for pid, count in enumerate(counts) if count >= 4}
    rounds = sampler.rounds()
    seen_images = set()
    for _ in range(40):
        round_batches = next(rounds)
        flat = [i for batch in round_batches for i in batch]
        assert len(flat) == len(set(flat))  # no image twice within a round
        per_identity = Counter(items[i][1] for i in flat)
        # every identity draws at most its chunks, whole chunks of K only
        assert all(per_identity[pid] <= counts[pid] // 4 * 4 for pid in per_identity)
        assert set(per_identity) <= eligible
        for batch in round_batches:
            assert len(batch) == 12
            pids = [items[i][1] for i in batch]
            groups = [pids[4 * k: 4 * (k + 1)] for k in range(3)]
            assert all(len(set(group)) == 1 for group in groups)
            assert len({group[0] for group in groups}) == 3  # P distinct identities
        seen_images |= set(flat)
    # the remainder dropped differs between rounds: over many rounds every image shows up
    assert seen_images == {i for i, item in enumerate(items) if item[1] in eligible}


def test_chunked_sampler_round_ends_when_fewer_than_p_identities_have_chunks():
    # identity 0 has 2 chunks, 1 and 2 one each; P = 2 picked uniformly among those with chunks
    # left. With probability 1/3 the first batch is {1, 2}: identity 0 is then alone, the round
    # ends after one batch and its chunks are dropped; otherwise 0 pairs with both (2 batches).
    items = identity_items([8, 4, 4])
    rounds = ChunkedIdentitySampler(items, global_batch_size=8, num_instances=4, seed=1).rounds()
    short = 0
    for _ in range(900):
        round_batches = next(rounds)
        pids = [sorted({items[i][1] for i in batch}) for batch in round_batches]
        assert pids in ([[1, 2]], [[0, 1], [0, 2]], [[0, 2], [0, 1]])
        short += len(round_batches) == 1
    assert short / 900 == pytest.approx(1 / 3, abs=0.05)  # 3.5 standard deviations


def test_chunked_sampler_is_a_pure_function_of_its_seed():
    items = identity_items([5, 9, 4, 12, 7, 4, 6])
    def first(seed, n=30):
        stream = ChunkedIdentitySampler(items, global_batch_size=8, num_instances=4, seed=seed).batches()
        return [next(stream) for _ in range(n)]
    assert first(7) == first(7)
    assert first(7) != first(8)
    sampler = ChunkedIdentitySampler(items, global_batch_size=8, num_instances=4, seed=7)
    stream = iter(sampler)  # one process: the flat index stream is the batches one after another
    assert [next(stream) for _ in range(8 * 30)] == [i for batch in first(7) for i in batch]


def test_chunked_sampler_refuses_impossible_settings_naming_the_keys():
    items = identity_items([4, 4, 3, 8])
    with pytest.raises(ValueError, match=r"SOLVER.IMS_PER_BATCH \(10\).*NUM_INSTANCE \(4\)"):
        ChunkedIdentitySampler(items, global_batch_size=10, num_instances=4, seed=0)
    with pytest.raises(ValueError, match=r"only 3 of 4 identities.*NUM_INSTANCE \(4\).*needs 4"):
        ChunkedIdentitySampler(items, global_batch_size=16, num_instances=4, seed=0)
    with pytest.raises(ValueError, match="NUM_INSTANCE"):
        ChunkedIdentitySampler(items, global_batch_size=8, num_instances=0, seed=0)


def bilinear_by_hand(image, out_height, out_width):
    """Bilinear interpolation with half-pixel centres, clamped at the border, one pixel at a time."""
    def taps(dest, size_in, size_out):
        source = max((dest + 0.5) * size_in / size_out - 0.5, 0.0)
        low = min(int(np.floor(source)), size_in - 1)
        return low, min(low + 1, size_in - 1), source - low

    image = image.astype(np.float64)
    out = np.zeros((out_height, out_width) + image.shape[2:])
    for y in range(out_height):
        y0, y1, fy = taps(y, image.shape[0], out_height)
        for x in range(out_width):
            x0, x1, fx = taps(x, image.shape[1], out_width)
            top = (1 - fx) * image[y0, x0] + fx * image[y0, x1]
            bottom = (1 - fx) * image[y1, x0] + fx * image[y1, x1]
            out[y, x] = (1 - fy) * top + fy * bottom
    return out


def test_cv2_bilinear_resize_matches_half_pixel_bilinear_by_hand_and_not_pil_bicubic():
    # one row [0, 100] to 4 columns: sources -0.25 (clamped), 0.25, 0.75, 1.25 (clamped)
    row = np.array([[0, 100]], dtype=np.uint8)
    assert resize_bilinear_half_pixel(row, 1, 4).tolist() == [[0, 25, 75, 100]]
    image = np.random.default_rng(0).integers(0, 256, size=(5, 4, 3), dtype=np.uint8)
    for size in [(9, 3), (2, 7), (384 // 40, 128 // 40)]:
        ours = np.asarray(CV2BilinearResize(size)(Image.fromarray(image)))
        assert ours.shape == size + (3,) and ours.dtype == np.uint8
        assert np.abs(ours - bilinear_by_hand(image, *size)).max() <= 0.5 + 1e-6
        bicubic = np.asarray(Image.fromarray(image).resize(size[::-1], Image.BICUBIC))
        assert np.abs(bicubic.astype(float) - bilinear_by_hand(image, *size)).max() > 5
    with pytest.raises(ValueError, match="INPUT.SIZE_TRAIN"):
        CV2BilinearResize(256)


def erased_boxes(erasing, height, width, count):
    """(top, left, height, width) of the rectangle each of `count` erasings of a black image
    filled; None where it erased nothing."""
    boxes = []
    for _ in range(count):
        changed = erasing(torch.zeros(3, height, width)).abs().sum(0) > 0
        rows, cols = torch.nonzero(changed.any(1)), torch.nonzero(changed.any(0))
        if len(rows) == 0:
            boxes.append(None)
            continue
        box_h, box_w = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        assert int(changed.sum()) == box_h * box_w  # one solid rectangle
        boxes.append((int(rows[0]), int(cols[0]), box_h, box_w))
    return boxes


def protocol_boxes(rng, height, width, count):
    """The protocol's first accepted attempt, simulated with numpy (every attempt accepted here)."""
    area = rng.uniform(0.02, 0.4, count) * height * width
    aspect = rng.uniform(0.3, 1 / 0.3, count)
    box_h, box_w = np.round(np.sqrt(area * aspect)), np.round(np.sqrt(area / aspect))
    ok = (box_h < height) & (box_w < width)
    return box_h[ok], box_w[ok]


def test_keras_erasing_fills_the_cifar_mean_with_probability_one_half():
    torch.manual_seed(0)
    erasing = KerasRandomErasing(prob=0.5)
    image = torch.zeros(3, 48, 16)
    outputs = [erasing(image) for _ in range(600)]
    assert torch.equal(image, torch.zeros(3, 48, 16))  # the caller's tensor is left alone
    erased = [out for out in outputs if out.abs().sum() > 0]
    assert len(erased) / 600 == pytest.approx(0.5, abs=0.07)
    # the original writes (0.4914, 0.4822, 0.4465) x 255 into a uint8 RGB image: truncated
    colours = {tuple(out[:, mask].T[0].tolist()) for out in erased
               for mask in [out.abs().sum(0) > 0]}
    assert colours == {(125.0, 122.0, 113.0)}


def test_keras_erasing_area_and_aspect_follow_the_protocol_not_torchvisions():
    torch.manual_seed(1)
    height, width, count = 96, 64, 1500
    ours = erased_boxes(KerasRandomErasing(prob=1.0), height, width, count)
    assert None not in ours
    ours_area = np.array([h * w for _, _, h, w in ours]) / (height * width)
    ours_aspect = np.array([h / w for _, _, h, w in ours])
    ref_h, ref_w = protocol_boxes(np.random.default_rng(0), height, width, 20000)
    assert ks_2samp(ours_area, ref_h * ref_w / (height * width)).pvalue > 1e-3
    assert ks_2samp(ours_aspect, ref_h / ref_w).pvalue > 1e-3
    assert ours_area.max() > 0.36  # torchvision's stops at 0.33
    # numpy's randint(0, H - h) in the original: a box never reaches the last row or column
    assert max(top + h for top, _, h, _ in ours) == height - 1
    assert max(left + w for _, left, _, w in ours) == width - 1
    torchvision_boxes = erased_boxes(T.RandomErasing(p=1.0, value=1.0), height, width, count)
    theirs_aspect = np.array([h / w for _, _, h, w in torchvision_boxes if h])
    assert ks_2samp(theirs_aspect, ref_h / ref_w).pvalue < 1e-6  # log-uniform aspect differs


def test_keras_erasing_makes_up_to_one_hundred_attempts():
    # On a 100 x 2 image an attempt fits only if its width rounds to 1: rare, so the erased
    # fraction tells the number of attempts: 1 - (1 - q) ** attempts.
    rng = np.random.default_rng(2)
    area = rng.uniform(0.02, 0.4, 400000) * 200
    aspect = rng.uniform(0.3, 1 / 0.3, 400000)
    q = np.mean((np.round(np.sqrt(area * aspect)) < 100) & (np.round(np.sqrt(area / aspect)) < 2))
    assert 0.005 < q < 0.03
    torch.manual_seed(2)
    boxes = erased_boxes(KerasRandomErasing(prob=1.0), 100, 2, 1500)
    erased = np.mean([box is not None for box in boxes])
    assert erased == pytest.approx(1 - (1 - q) ** 100, abs=0.05)
    assert abs(erased - (1 - (1 - q) ** 10)) > 0.3
    assert all(box[3] == 1 for box in boxes if box)


def test_transform_keys_swap_only_the_selected_steps(dataset_root, tmp_path):
    default = tiny_cfg(dataset_root, tmp_path, "INPUT.REA.ENABLED", "True")
    for is_train in (True, False):
        assert repr(build_transforms(default, is_train)) == repr(fastreid_transforms(default, is_train))
    paper = tiny_cfg(dataset_root, tmp_path, *PAPER_DATA)
    train = [type(step) for step in build_transforms(paper, True).transforms]
    fastreid_train = [type(step) for step in fastreid_transforms(paper, True).transforms]
    assert train == [CV2BilinearResize if t is T.Resize else
                     KerasRandomErasing if t is T.RandomErasing else t for t in fastreid_train]
    assert train[-1] is KerasRandomErasing  # erases last, on the 0-255 tensor, as the original
    test = build_transforms(paper, False).transforms
    assert type(test[0]) is CV2BilinearResize and test[0].size == (64, 32)
    for key, value in [("INPUT.REA.IMPL", "torch"), ("INPUT.RESIZE_IMPL", "cv2")]:
        with pytest.raises(ValueError, match=key):
            build_transforms(tiny_cfg(dataset_root, tmp_path, key, value), True)


def test_tiny_run_with_the_paper_data_pipeline_trains(dataset_root, tmp_path):
    cfg = tiny_cfg(dataset_root, tmp_path, *PAPER_DATA)
    loader = Trainer.build_train_loader(cfg)
    assert isinstance(loader.batch_sampler.sampler, ChunkedIdentitySampler)
    batch = next(iter(loader))
    assert batch["images"].shape == (16, 3, 64, 32)
    targets = batch["targets"].tolist()
    assert all(len(set(targets[k:k + 4])) == 1 for k in range(0, 16, 4))
    out = tmp_path / "paper_data"
    run_train_net(["--config-file", SYNTHETIC_BASE, *tiny_opts(
        dataset_root, out, *PAPER_DATA, "SOLVER.MAX_EPOCH", "3", "TEST.EVAL_PERIOD", "3")])
    losses = read_losses(out)
    assert len(losses) == 6 and losses[-1][1] < losses[0][1]


def test_paper_configs_use_the_original_data_pipeline_and_synthetic_ones_fastreids():
    paper = glob.glob(os.path.join(REPO, "configs", "Paper", "*", "*.yml"))
    synthetic = glob.glob(os.path.join(REPO, "configs", "Synthetic", "*.yml"))
    assert len(paper) >= 15 and synthetic
    for path in paper + synthetic:
        cfg = load_config(path, ["MODEL.DEVICE", "cpu"])
        chosen = (cfg.DATALOADER.SAMPLER_TRAIN, cfg.INPUT.REA.IMPL, cfg.INPUT.RESIZE_IMPL)
        if path in paper:
            assert chosen == ("ChunkedIdentitySampler", "keras", "cv2_bilinear"), path
            steps = [type(step) for step in build_transforms(cfg, True).transforms]
            assert steps[0] is CV2BilinearResize and steps[-1] is KerasRandomErasing, path
        else:
            assert chosen[1:] == ("fastreid", "pil_bicubic"), path
