"""Robustness evaluation: Rank-1 / mAP clean and under attack, against fast-reid's evaluator."""
from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch

import adaptive_l2  # noqa: F401  (compat patches before fast-reid imports)
from adaptive_l2.adversarial import embed
from adaptive_l2.evaluation.robustness import (AttackSpec, evaluate_robustness,
                                               format_robustness_comparison,
                                               format_robustness_table)
from fastreid.evaluation.rank import evaluate_rank
from fastreid.utils.compute_dist import build_dist

from small_models import HEIGHT, WIDTH, small_cfg, small_model


def _write_test_set(root: Path, num_ids: int = 4, per_id: int = 3) -> List[tuple]:
    from PIL import Image

    rng = np.random.default_rng(0)
    items = []
    for pid in range(num_ids):
        base = rng.integers(0, 256, size=(HEIGHT // 8, WIDTH // 8, 3)).repeat(8, 0).repeat(8, 1)
        for index in range(per_id):
            noisy = np.clip(base + rng.normal(0, 6, size=base.shape), 0, 255).astype(np.uint8)
            path = root / f"{pid:04d}_c{index}_{index}.jpg"
            Image.fromarray(noisy).save(path, quality=95)
            items.append((str(path), pid, index))
    # one image per id as query (camera 0), the rest gallery
    queries = [item for item in items if item[2] == 0]
    gallery = [item for item in items if item[2] != 0]
    return queries + gallery


@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true")
@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")  # fast-reid's ToTensor
def test_evaluate_robustness_matches_fastreid_and_attacks_do_not_help(tmp_path: Path):
    from fastreid.data.build import build_reid_test_loader
    from fastreid.data.common import CommDataset
    from fastreid.data.transforms import build_transforms

    items = _write_test_set(tmp_path)
    num_query = 4
    dataset = CommDataset(items, build_transforms(small_cfg(), is_train=False), relabel=False)
    loader, _ = build_reid_test_loader(
        dataset, test_batch_size=3, num_query=num_query, num_workers=0
    )
    model = small_model(seed=2)
    attacks = (AttackSpec.clean(), AttackSpec.fgsm(8), AttackSpec.pgd(8))
    results = evaluate_robustness(model, loader, num_query, attacks=attacks, seed=0)
    assert list(results) == ["clean", "FGSM eps=8", "PGD-10 eps=8"]

    model.eval()
    batches = list(loader)
    with torch.no_grad():
        features = torch.cat([embed(model, b["images"]) for b in batches])
    pids = torch.cat([b["targets"] for b in batches]).numpy()
    camids = torch.cat([b["camids"] for b in batches]).numpy()
    distances = build_dist(features[:num_query], features[num_query:], "cosine")
    cmc, all_ap, _ = evaluate_rank(
        distances, pids[:num_query], pids[num_query:], camids[:num_query], camids[num_query:]
    )
    assert results["clean"].rank1 == pytest.approx(cmc[0] * 100)
    assert results["clean"].mAP == pytest.approx(np.mean(all_ap) * 100)
    assert results["PGD-10 eps=8"].rank1 <= results["clean"].rank1
    assert results["PGD-10 eps=8"].mAP <= results["clean"].mAP

    again = evaluate_robustness(model, batches, num_query, attacks=attacks[1:2], seed=0)
    assert again["FGSM eps=8"] == results["FGSM eps=8"]  # seeded per attack, list-independent

    table = format_robustness_table(results)
    assert table.splitlines()[0] == "| attack | eps (0-255) | Rank-1 (%) | mAP (%) |"
    assert "| PGD-10 | 8 |" in table
    both = format_robustness_comparison({"baseline": results, "sgp": again})
    assert "baseline Rank-1 (%)" in both and "| clean | 0 |" in both
