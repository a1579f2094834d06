"""k-reciprocal re-ranking on CPU: fast-reid's CPU-path numbers, usable by its evaluator."""
import adaptive_l2  # noqa: F401  (first: fast-reid compatibility patches)

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastreid.evaluation.rank import evaluate_rank
from fastreid.utils.compute_dist import compute_cosine_distance, compute_jaccard_distance

from adaptive_l2.evaluation.rerank import jaccard_distance, rerank_distance

TOLERANCE = 1e-5


def clustered(num, dim, seed, per_id=8, spread=0.8, scale=1.0):
    """L2-normalized (times `scale`) features with identities as overlapping clusters."""
    rng = np.random.default_rng(seed)
    num_ids = max(2, num // per_id)
    labels = rng.integers(0, num_ids, num)
    centres = rng.standard_normal((num_ids, dim))
    feats = centres[labels] + spread * rng.standard_normal((num, dim))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    return torch.from_numpy((scale * feats).astype(np.float32)), labels


def fastreid_cpu(features, k1, k2):
    return compute_jaccard_distance(features, k1=k1, k2=k2, search_option=3)


def assert_same_as_fastreid(features, k1, k2):
    expected = fastreid_cpu(features, k1, k2)
    got = jaccard_distance(features, k1=k1, k2=k2)
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert np.abs(got - expected).max() <= TOLERANCE
    # The same pairs share k-reciprocal neighbours (distance < 1) in both.
    np.testing.assert_array_equal(got < 1 - 1e-4, expected < 1 - 1e-4)
    return got


@pytest.mark.parametrize(
    "num, dim, k1, k2, seed",
    [
        (60, 16, 20, 6, 0),
        (300, 64, 20, 6, 1),
        (400, 32, 7, 1, 2),  # k2 = 1: no query expansion
        (250, 48, 30, 10, 3),
        (150, 32, 5, 3, 4),
        (200, 32, 20, 30, 5),  # k2 > k1: fast-reid averages only k1 rows
        (40, 8, 40, 6, 6),  # k1 = N
        (120, 16, 1, 1, 7),  # k1 = 1: the half-size sets are the sample alone
    ],
)
def test_equal_to_fastreid_cpu_path(num, dim, k1, k2, seed):
    features, labels = clustered(num, dim, seed)
    dist = assert_same_as_fastreid(features, k1, k2)
    if k1 > 1:  # non-trivial: the distance separates identities
        same = labels[:, None] == labels[None, :]
        np.fill_diagonal(same, False)
        different = labels[:, None] != labels[None, :]
        assert dist[same].mean() < dist[different].mean() - 0.1


def test_equal_with_unnormalized_features():
    """Euclidean features: larger squared distances, sharper softmax weights."""
    features, _ = clustered(300, 32, 8, scale=3.0)
    assert_same_as_fastreid(features, 20, 6)


def test_equal_with_ties_and_duplicates():
    """Exact duplicates (one group larger than k1) and a coarse grid give tied distances."""
    rng = np.random.default_rng(9)
    base = rng.integers(-2, 3, size=(60, 12)).astype(np.float32)
    copies = rng.integers(1, 4, size=60)
    copies[0] = 25  # more copies than k1: self may fall out of its own top-k1
    features = torch.from_numpy(np.repeat(base, copies, axis=0))
    dist = assert_same_as_fastreid(features, 20, 6)
    assert dist.shape[0] == copies.sum()


def test_equal_for_float64_strided_and_grad_inputs():
    features, _ = clustered(200, 32, 13)
    expected = fastreid_cpu(features, 20, 6)
    strided = torch.cat((features, features), dim=1)[:, :32]  # not contiguous
    for variant in (features.double(), strided, features.clone().requires_grad_(True)):
        assert np.abs(jaccard_distance(variant, 20, 6) - expected).max() <= TOLERANCE


def test_rerank_distance_is_the_evaluator_formula():
    features, _ = clustered(260, 32, 10)
    query, gallery = F.normalize(features[:60], dim=1), F.normalize(features[60:], dim=1)
    original = compute_cosine_distance(query, gallery)
    got = rerank_distance(query, gallery, original, k1=20, k2=6, lambda_value=0.3)

    expected = fastreid_cpu(torch.cat((query, gallery)), 20, 6)[:60, 60:] * 0.7 + original * 0.3
    assert got.shape == (60, 200) and got.dtype == np.float32
    assert np.abs(got - expected).max() <= TOLERANCE
    ours = jaccard_distance(torch.cat((query, gallery)), 20, 6)[:60, 60:] * (1 - 0.3)
    np.testing.assert_array_equal(got, ours + original * 0.3)


def test_invalid_arguments_raise_clear_errors():
    features, _ = clustered(30, 8, 11)
    with pytest.raises(ValueError, match="at least k1"):
        jaccard_distance(features, k1=31)
    with pytest.raises(ValueError, match="k2 must be a positive integer"):
        jaccard_distance(features, k1=5, k2=0)
    with pytest.raises(ValueError, match="2-D"):
        jaccard_distance(features[0], k1=5)
    with pytest.raises(TypeError, match="torch.Tensor"):
        jaccard_distance(features.numpy(), k1=5)
    with pytest.raises(ValueError, match="shape"):
        rerank_distance(features[:10], features[10:], np.zeros((10, 10)), k1=5)


def _reid_split(seed=12, num_ids=40, dim=64):
    """Query (camera 0) and gallery (cameras 1-5) of the same identities, clustered features."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_ids, dim))
    query_ids = np.repeat(np.arange(num_ids), 2)
    gallery_ids = np.repeat(np.arange(num_ids), rng.integers(4, 9, num_ids))
    pids = np.concatenate((query_ids, gallery_ids))
    camids = np.concatenate((np.zeros(query_ids.size), rng.integers(1, 6, gallery_ids.size)))
    feats = centres[pids] + 1.5 * rng.standard_normal((pids.size, dim))
    return (
        torch.from_numpy(feats.astype(np.float32)),
        torch.from_numpy(pids),
        torch.from_numpy(camids.astype(np.int64)),
        query_ids.size,
    )


def _evaluate(feats, pids, camids, num_query, rerank):
    from fastreid.config import get_cfg
    from fastreid.evaluation.reid_evaluation import ReidEvaluator

    cfg = get_cfg()
    cfg.TEST.METRIC = "cosine"
    cfg.TEST.RERANK.ENABLED = rerank
    evaluator = ReidEvaluator(cfg, num_query)
    for batch in torch.split(torch.arange(pids.numel()), 64):  # batches, as in inference
        evaluator.process({"targets": pids[batch], "camids": camids[batch]}, feats[batch])
    return evaluator.evaluate()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_fastreid_evaluator_reranks_on_cpu():
    feats, pids, camids, num_query = _reid_split()
    plain = _evaluate(feats, pids, camids, num_query, rerank=False)
    reranked = _evaluate(feats, pids, camids, num_query, rerank=True)

    for result in (plain, reranked):
        for key in ("Rank-1", "mAP"):
            assert np.isfinite(result[key]) and 0 < result[key] <= 100
    # Re-ranking exploits the gallery's cluster structure: mAP 69 -> 86 on this data.
    assert reranked["mAP"] > plain["mAP"] + 5

    # And the evaluator's numbers are those of fast-reid's own CPU re-ranking and formula.
    normed = F.normalize(feats, dim=1)
    query, gallery = normed[:num_query], normed[num_query:]
    dist = compute_cosine_distance(query, gallery)
    k1, k2, lam = 20, 6, 0.3  # fast-reid's TEST.RERANK defaults
    jaccard = fastreid_cpu(normed, k1, k2)[:num_query, num_query:]
    dist = jaccard * (1 - lam) + dist * lam
    pid, cam = pids.numpy(), camids.numpy()
    cmc, all_ap, _ = evaluate_rank(
        dist, pid[:num_query], pid[num_query:], cam[:num_query], cam[num_query:]
    )
    assert reranked["mAP"] == pytest.approx(np.mean(all_ap) * 100, abs=1e-4)
    assert reranked["Rank-1"] == pytest.approx(cmc[0] * 100, abs=1e-4)


def test_query_by_gallery_block_equals_the_slice_of_the_full_matrix():
    import torch

    from adaptive_l2.evaluation.rerank import jaccard_distance

    generator = torch.Generator().manual_seed(3)
    centres = torch.randn(12, 32, generator=generator)
    features = centres.repeat_interleave(10, dim=0) + 0.3 * torch.randn(120, 32, generator=generator)
    full = jaccard_distance(features, k1=8, k2=3)
    for num_query in (1, 17, 60, 119):
        block = jaccard_distance(features, k1=8, k2=3, num_query=num_query)
        assert block.shape == (num_query, 120 - num_query)
        assert np.array_equal(block, full[:num_query, num_query:])
