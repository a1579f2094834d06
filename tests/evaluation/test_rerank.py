"""k-reciprocal re-ranking: fast-reid's variant (its CPU-path numbers) and the original one
(Zhong et al.'s code), sparse and blocked, wired into fast-reid's evaluator."""
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


def _evaluate(feats, pids, camids, num_query, rerank, **overrides):
    from fastreid.config import get_cfg
    from fastreid.evaluation.reid_evaluation import ReidEvaluator

    from adaptive_l2.config import add_reg_config

    cfg = add_reg_config(get_cfg())
    cfg.TEST.METRIC = "cosine"
    cfg.TEST.RERANK.ENABLED = rerank
    cfg.merge_from_list([item for pair in overrides.items() for item in pair])
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


# ---- The original variant (Zhong et al.'s code, as the paper ran it) ------------------------


def cosine_distance(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return 1 - a @ b.T


def fastreid_bundled_original(query, gallery, k1, k2, lam):
    """fast-reid's bundled copy of Zhong et al.'s dense code, on float64 cosine distances."""
    from fastreid.evaluation.rerank import re_ranking

    q, g = query.double().numpy(), gallery.double().numpy()
    return re_ranking(cosine_distance(q, g), cosine_distance(q, q), cosine_distance(g, g),
                      k1=k1, k2=k2, lambda_value=lam)


def dense_original(query, gallery, k1, k2, lam):
    """Independent dense re-implementation, written from the algorithm's description."""
    feats = np.concatenate((query.double().numpy(), gallery.double().numpy()))
    squared = cosine_distance(feats, feats) ** 2
    # Each column divided by its maximum, then transposed as the code does: row i scaled by the
    # maximum of its own distances (the matrix is symmetric).
    scaled = (squared / squared.max(axis=0, keepdims=True)).T
    order = np.argsort(scaled, axis=1, kind="stable")
    num, num_query = feats.shape[0], query.shape[0]

    def reciprocal(i, k):
        return {j for j in order[i, : k + 1] if i in order[j, : k + 1]}

    weights = np.zeros((num, num))
    for i in range(num):
        own = reciprocal(i, k1)
        expanded = set(own)
        for candidate in own:
            theirs = reciprocal(candidate, round(k1 / 2))
            if len(theirs & own) > 2 / 3 * len(theirs):
                expanded |= theirs
        members = sorted(expanded)
        kernel = np.exp(-scaled[i, members])
        weights[i, members] = kernel / kernel.sum()
    if k2 != 1:
        weights = np.stack([weights[order[i, :k2]].mean(axis=0) for i in range(num)])
    shared = np.stack([np.minimum(weights[i], weights).sum(axis=1) for i in range(num_query)])
    jaccard = 1 - shared / (2 - shared)
    return ((1 - lam) * jaccard + lam * scaled[:num_query])[:, num_query:]


def assert_same_ranking(got, expected, tie=1e-6):
    """Each query's gallery order by `got` is the order by `expected`, except swaps of items
    whose expected distances are within `tie` (float32 rounding of near-equal distances)."""
    ordered = np.take_along_axis(expected, np.argsort(got, axis=1, kind="stable"), axis=1)
    assert (np.diff(ordered, axis=1) >= -tie).all()
    same = np.argsort(got, axis=1, kind="stable") == np.argsort(expected, axis=1, kind="stable")
    assert same.mean() > 0.99


@pytest.mark.parametrize(
    "num, num_query, dim, k1, k2, lam, scale, seed",
    [
        (300, 60, 32, 20, 6, 0.3, 1.0, 20),  # the paper's settings
        (240, 40, 16, 7, 1, 0.5, 3.0, 21),  # odd k1 (round(3.5) = 4), no query expansion, scale
        (200, 50, 24, 5, 12, 0.1, 0.2, 22),  # k2 > k1 + 1: expansion over more than the k1 table
        (120, 30, 16, 20, 6, 0.0, 1.0, 23),  # lambda 0: Jaccard alone
    ],
)
def test_original_variant_equals_both_dense_references(num, num_query, dim, k1, k2, lam, scale,
                                                       seed):
    features, _ = clustered(num, dim, seed, scale=scale)
    query, gallery = features[:num_query], features[num_query:]
    given = features.clone()
    got = rerank_distance(query, gallery, k1=k1, k2=k2, lambda_value=lam, variant="original")
    assert torch.equal(features, given)  # the caller's features are not normalized in place
    bundled = fastreid_bundled_original(query, gallery, k1, k2, lam)
    dense = dense_original(query, gallery, k1, k2, lam)
    assert got.dtype == np.float32 and got.shape == bundled.shape == (num_query, num - num_query)
    assert np.abs(bundled - dense).max() <= TOLERANCE  # the two references agree
    assert np.abs(got - bundled).max() <= TOLERANCE
    assert np.abs(got - dense).max() <= TOLERANCE
    assert_same_ranking(got, bundled)
    assert_same_ranking(got, dense)


def test_the_two_variants_give_different_distances():
    features, _ = clustered(300, 32, 24)
    query, gallery = F.normalize(features[:60], dim=1), F.normalize(features[60:], dim=1)
    original = rerank_distance(query, gallery, variant="original")
    fastreid = rerank_distance(query, gallery, compute_cosine_distance(query, gallery))
    assert np.abs(original - fastreid).mean() > 0.05


@pytest.mark.parametrize("variant", ["original", "fastreid"])
def test_blocked_equals_unblocked(variant):
    features, _ = clustered(260, 32, 25)
    query, gallery = features[:50], features[50:]
    base = None if variant == "original" else compute_cosine_distance(query, gallery)
    results = [rerank_distance(query, gallery, base, variant=variant, block_rows=rows)
               for rows in (260, 1, 7, 64)]
    if variant == "fastreid":  # the torch pass instead of faiss, blocked and not
        results += [jaccard_distance(features, 20, 6, num_query=50, block_rows=rows,
                                     search="torch") * 0.7 + base * 0.3 for rows in (260, 9)]
    for result in results[1:]:
        assert np.abs(result - results[0]).max() <= 1e-6
        assert_same_ranking(result, results[0])


def test_torch_search_equals_fastreid_cpu_path():
    """The blocked torch pass (the path CUDA features take) gives fast-reid's CPU numbers."""
    for seed, scale in ((26, 1.0), (27, 3.0)):
        features, _ = clustered(300, 48, seed, scale=scale)
        expected = fastreid_cpu(features, 20, 6)
        got = jaccard_distance(features, 20, 6, block_rows=41, search="torch")
        assert np.abs(got - expected).max() <= TOLERANCE
        np.testing.assert_array_equal(got < 1 - 1e-4, expected < 1 - 1e-4)


@pytest.mark.parametrize("variant", ["original", "fastreid"])
def test_no_n_by_n_allocation(variant, monkeypatch):
    """Distance blocks are block_rows x block_rows, and numpy never holds even a quarter of an N x N
    float32 array (the block-size constants are shrunk so that they do not dominate at this N)."""
    import tracemalloc

    from adaptive_l2.evaluation import rerank

    num, num_query = 4000, 100
    features, _ = clustered(num, 16, 28)
    shapes = []
    host_block = rerank._distance_block

    def recording_block(*args, **kwargs):
        block = host_block(*args, **kwargs)
        shapes.append(tuple(block.shape))
        return block

    monkeypatch.setattr(rerank, "_distance_block", recording_block)
    monkeypatch.setattr(rerank, "_GATHER_ELEMENTS", 1 << 16)
    monkeypatch.setattr(rerank, "_PAIR_ELEMENTS", 1 << 16)
    tracemalloc.start()
    try:
        if variant == "original":
            result = rerank.rerank_distance(features[:num_query], features[num_query:], k1=10,
                                            k2=4, variant="original", block_rows=256)
        else:  # the torch pass, which CUDA features take
            result = rerank.jaccard_distance(features, 10, 4, num_query=num_query,
                                             block_rows=256, search="torch")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.shape == (num_query, num - num_query)
    assert result.min() < 0.9  # neighbours were found: a real run
    blocks = -(-num // 256)  # the blocks on and above the diagonal
    assert len(shapes) == blocks * (blocks + 1) // 2
    assert all(rows <= 256 and cols <= 256 for rows, cols in shapes)
    assert peak < num * num, f"numpy peak {peak / 2**20:.1f} MiB"


# ---- Evaluator wiring ---------------------------------------------------------------------


def test_fastreid_evaluator_reranks_in_the_original_variant():
    feats, pids, camids, num_query = _reid_split()
    cfg_overrides = {"TEST.RERANK.VARIANT": "original"}
    reranked = _evaluate(feats, pids, camids, num_query, rerank=True, **cfg_overrides)
    fastreid_variant = _evaluate(feats, pids, camids, num_query, rerank=True)
    dist = fastreid_bundled_original(feats[:num_query], feats[num_query:], 20, 6, 0.3)
    pid, cam = pids.numpy(), camids.numpy()
    cmc, all_ap, _ = evaluate_rank(
        dist, pid[:num_query], pid[num_query:], cam[:num_query], cam[num_query:]
    )
    assert reranked["mAP"] == pytest.approx(np.mean(all_ap) * 100, abs=1e-4)
    assert reranked["Rank-1"] == pytest.approx(cmc[0] * 100, abs=1e-4)
    assert reranked["mAP"] != fastreid_variant["mAP"]


def test_evaluator_keeps_features_on_their_device_when_reranking():
    """The "meta" device stands in for CUDA: fast-reid's own process cannot copy it to the CPU."""
    from fastreid.config import get_cfg
    from fastreid.evaluation.reid_evaluation import ReidEvaluator

    cfg = get_cfg()
    cfg.TEST.RERANK.ENABLED = True
    evaluator = ReidEvaluator(cfg, 2)
    ids = {"targets": torch.arange(4), "camids": torch.zeros(4, dtype=torch.int64)}
    evaluator.process(ids, torch.empty(4, 8, device="meta", dtype=torch.float16))
    kept = evaluator._predictions[-1]
    assert kept["feats"].device.type == "meta" and kept["feats"].dtype == torch.float32
    assert kept["pids"].device.type == "cpu" and kept["camids"].device.type == "cpu"
    cfg.TEST.AQE.ENABLED = True  # AQE's host code needs CPU tensors: the host's behaviour
    evaluator.process(ids, torch.ones(4, 8, dtype=torch.float64))
    assert evaluator._predictions[-1]["feats"].dtype == torch.float32


def test_evaluator_leaves_the_callers_config_alone():
    feats, pids, camids, num_query = _reid_split()
    from fastreid.config import get_cfg
    from fastreid.evaluation.reid_evaluation import ReidEvaluator

    cfg = get_cfg()
    cfg.TEST.RERANK.ENABLED = True
    cfg.freeze()
    evaluator = ReidEvaluator(cfg, num_query)
    evaluator.process({"targets": pids, "camids": camids}, feats)
    evaluator.evaluate()
    assert evaluator.cfg is cfg and cfg.TEST.RERANK.ENABLED and cfg.is_frozen()


def test_paper_configs_rerank_in_the_original_variant():
    from conftest import REPO

    from adaptive_l2.config import load_config
    from adaptive_l2.config import add_reg_config
    from fastreid.config import get_cfg

    assert add_reg_config(get_cfg()).TEST.RERANK.VARIANT == "fastreid"  # fast-reid's default
    dagger = load_config(f"{REPO}/configs/Paper/Market1501/adaptive_l2_R152_rerank.yml",
                         ["MODEL.DEVICE", "cpu"])
    assert dagger.TEST.RERANK.ENABLED and dagger.TEST.RERANK.VARIANT == "original"


def test_bad_variant_and_metric_are_refused():
    features, _ = clustered(60, 8, 29)
    query, gallery = features[:10], features[10:]
    with pytest.raises(ValueError, match="variant must be one of"):
        rerank_distance(query, gallery, variant="zhong")
    with pytest.raises(ValueError, match="original_dist=None"):
        rerank_distance(query, gallery, np.zeros((10, 50)), variant="original")
    with pytest.raises(ValueError, match="needs original_dist"):
        rerank_distance(query, gallery)
    with pytest.raises(ValueError, match="block_rows"):
        rerank_distance(query, gallery, variant="original", block_rows=0)
    with pytest.raises(ValueError, match="search"):
        jaccard_distance(features, 5, search="gpu")
    feats, pids, camids, num_query = _reid_split()
    with pytest.raises(ValueError, match="TEST.RERANK.VARIANT"):
        _evaluate(feats, pids, camids, num_query, rerank=True, **{"TEST.RERANK.VARIANT": "x"})
    with pytest.raises(ValueError, match="TEST.METRIC cosine"):
        _evaluate(feats, pids, camids, num_query, rerank=True,
                  **{"TEST.RERANK.VARIANT": "original", "TEST.METRIC": "euclidean"})
