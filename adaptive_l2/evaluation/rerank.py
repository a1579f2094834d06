"""k-reciprocal re-ranking (Zhong et al., CVPR 2017), sparse and blocked, on the features' device.

Two variants of the algorithm are in use, and they give different numbers:

* ``"original"``: Zhong et al.'s code as the paper ran it (nixingyang/AdaptiveL2Regularization,
  evaluation/post_processing/re_ranking_ranklist.py; torchreid's `re_ranking` and fast-reid's
  bundled `fastreid.evaluation.rerank.re_ranking` are the same). Distances are 1 - cos, squared,
  and divided by the maximum of their row over all query + gallery samples; k-reciprocal sets over
  the k1 + 1 nearest (self included), expansion sets over round(k1 / 2) + 1; weights
  exp(-scaled distance); result (1 - lambda) x Jaccard + lambda x scaled distance.
* ``"fastreid"``: fast-reid's `compute_jaccard_distance` and evaluator: k1 nearest, weights
  exp(-squared Euclidean distance of the features as given), lambda x the evaluator's distance.

fast-reid's implementations are dense: two N x N float32 matrices (N = query + gallery) filled
row by row in Python, 35 GB each at MSMT17 size. Here nothing is N x N:

1. one blocked pass finds each sample's nearest neighbours (`block_rows` x `block_rows` distances
   at a time, each block above the diagonal used for its rows and, transposed, for its columns,
   in torch on the features' device, CUDA included) and keeps a table of their distances; for
   the original variant it also takes each row's maximum and writes the scaled query x gallery
   distances. The fastreid variant on the CPU uses fast-reid's own faiss search instead, so its
   neighbour sets are exactly fast-reid's, tie order included;
2. the k-reciprocal sets, the 2/3 expansion and the k2 query expansion are integer and sparse
   operations (CPU, exact);
3. each expanded set's weights take their distances from the table, or, for the few members
   outside it, from gathered dot products on the features' device;
4. the Jaccard distance is summed in row blocks and combined in place with the base distance.

Floating-point results agree with the dense references to rounding (sums in another order).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple, Union

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

ArrayLike = Union[torch.Tensor, np.ndarray]

__all__ = ["VARIANTS", "evaluator_rerank_distance", "jaccard_distance", "rerank_distance"]

VARIANTS = ("fastreid", "original")

# Sizes (elements) of the temporary arrays of the vectorized steps. They are kept to a few MB on
# purpose: arrays of that size are recycled by the allocator, while larger fresh arrays pay a page
# fault per 4 KiB on first touch, which made the steps several times slower on a 2-core VM.
_GATHER_ELEMENTS = 1 << 21  # neighbour-of-neighbour rank tables, gathered feature rows
_PAIR_ELEMENTS = 1 << 20  # (row, row, min) triplets and the dense slab of one Jaccard block
# Distances per block of the neighbour pass (64 MiB of float32, 4096 x 4096): big enough for an
# efficient matrix product, small enough that the block never approaches N x N.
_BLOCK_ELEMENTS = 1 << 24
# The neighbour pass keeps this many times the widest window it needs: nearly every member of an
# expanded set is then in the table, and only the rest is gathered from the features.
_TABLE_FACTOR = 2


def jaccard_distance(features: torch.Tensor, k1: int = 20, k2: int = 6,
                     num_query: Optional[int] = None, block_rows: Optional[int] = None,
                     search: str = "auto") -> np.ndarray:
    """Jaccard distance of fast-reid's variant; N x N float32, like fast-reid's, or, with
    `num_query` (features = queries then gallery), only the num_query x (N - num_query) block the
    evaluation uses: at MSMT17 size (N = 93820) the full matrix alone would take 35 GB.

    Same result as `compute_jaccard_distance(features, k1, k2, search_option=3)` (faiss CPU),
    several times faster and in less memory: the neighbour sets are identical and the distances
    agree to float32 rounding (max abs difference about 1e-6 at Market-1501 size).

    `search`: "faiss" (fast-reid's CPU search, CPU features only), "torch" (the blocked pass on the
    features' device, `block_rows` rows at a time) or "auto" (faiss on the CPU, torch elsewhere).
    """
    _check_features(features)
    k1, k2 = _check_ks(k1, k2)
    num = features.size(0)
    if num < k1:
        raise ValueError(
            f"k-reciprocal re-ranking needs at least k1={k1} samples (query + gallery), got {num}"
        )
    if num_query is not None and not 0 < num_query < num:
        raise ValueError(f"num_query must be in 1 .. {num - 1}, got {num_query}")
    if search not in ("auto", "faiss", "torch"):
        raise ValueError(f"search must be 'auto', 'faiss' or 'torch', got {search!r}")
    on_cpu = features.device.type == "cpu"
    if search == "faiss" and not on_cpu:
        raise ValueError(f"search='faiss' needs CPU features, got features on {features.device}")
    feats = _as_float32(features)
    return _rerank(feats, "fastreid", k1, k2, num_query, _check_block_rows(block_rows),
                   use_faiss=search == "faiss" or (search == "auto" and on_cpu))


def rerank_distance(
    query_features: ArrayLike,
    gallery_features: ArrayLike,
    original_dist: Optional[ArrayLike] = None,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    variant: str = "fastreid",
    block_rows: Optional[int] = None,
    overwrite_original: bool = False,
) -> np.ndarray:
    """Re-ranked query x gallery distance (float32), in the chosen variant.

    "fastreid": `jaccard * (1 - lambda_value) + original_dist * lambda_value`, exactly fast-reid's
    `ReidEvaluator` formula, the Jaccard part on the features as given (for the cosine metric pass
    them L2-normalized, as the evaluator does). `overwrite_original=True` writes the result into
    `original_dist` (a float32 numpy array) instead of a copy, saving a query x gallery matrix.

    "original": Zhong et al.'s algorithm on the cosine distances of the features (any scale);
    `original_dist` must be None: the scaled distance is computed in the blocked pass.

    Runs on the query features' device (the gallery is moved there); the sparse steps run on CPU.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    query = torch.as_tensor(query_features)
    gallery = torch.as_tensor(gallery_features)
    if query.dim() != 2 or gallery.dim() != 2 or query.size(1) != gallery.size(1):
        raise ValueError(
            "query and gallery features must be 2-D with the same dimension, got "
            f"{tuple(query.shape)} and {tuple(gallery.shape)}"
        )
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"lambda_value must be in [0, 1], got {lambda_value}")
    k1, k2 = _check_ks(k1, k2)
    expected = (query.size(0), gallery.size(0))
    features = _as_float32(torch.cat((query, gallery.to(query.device)), dim=0))
    if variant == "original":
        if original_dist is not None:
            raise ValueError("variant 'original' computes its own scaled cosine distance: "
                             "pass original_dist=None")
        if expected[0] < 1 or expected[1] < 1:
            raise ValueError(f"need at least one query and one gallery sample, got {expected}")
        base = np.empty(expected, dtype=np.float32)  # filled with the scaled distances
        # `features` is our own concatenated copy: normalize it in place (saves N x dim floats).
        features.div_(features.norm(dim=1, keepdim=True).clamp_min_(1e-12))
        return _rerank(features, "original", k1, k2, expected[0],
                       _check_block_rows(block_rows), base=base, lambda_value=lambda_value)
    if original_dist is None:
        raise ValueError("variant 'fastreid' needs original_dist (the evaluator's distance)")
    base = _base_distance(original_dist, expected, overwrite_original)
    if features.size(0) < k1:
        raise ValueError(f"k-reciprocal re-ranking needs at least k1={k1} samples (query + "
                         f"gallery), got {features.size(0)}")
    return _rerank(features, "fastreid", k1, k2, expected[0], _check_block_rows(block_rows),
                   use_faiss=features.device.type == "cpu", base=base, lambda_value=lambda_value)


def evaluator_rerank_distance(
    query_features: torch.Tensor,
    gallery_features: torch.Tensor,
    metric: str,
    metric_distance: Callable[[torch.Tensor, torch.Tensor, str], np.ndarray],
    variant: str = "fastreid",
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
) -> np.ndarray:
    """The distance fast-reid's `ReidEvaluator` ranks by with TEST.RERANK, in either variant.

    "fastreid" keeps the evaluator's recipe: `metric_distance(query, gallery, metric)` (fast-reid's
    `build_dist`) as the base, Jaccard on the features L2-normalized for the cosine metric.
    "original" re-ranks cosine distances only, as the paper did; another metric is refused
    rather than silently ignored.
    """
    if variant not in VARIANTS:
        raise ValueError(f"TEST.RERANK.VARIANT must be one of {VARIANTS}, got {variant!r}")
    if variant == "original":
        if metric != "cosine":
            raise ValueError(f"TEST.RERANK.VARIANT 'original' re-ranks cosine distances; "
                             f"TEST.METRIC is {metric!r}: set TEST.METRIC cosine")
        return rerank_distance(query_features, gallery_features, None, k1, k2, lambda_value,
                               variant="original")
    base = np.ascontiguousarray(metric_distance(query_features, gallery_features, metric),
                                dtype=np.float32)
    if metric == "cosine":
        query_features = F.normalize(query_features, dim=1)
        gallery_features = F.normalize(gallery_features, dim=1)
    return rerank_distance(query_features, gallery_features, base, k1, k2, lambda_value,
                           variant="fastreid", overwrite_original=True)


def _check_features(features: torch.Tensor) -> None:
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if features.dim() != 2:
        raise ValueError(f"features must be 2-D (N x dim), got shape {tuple(features.shape)}")


def _check_ks(k1: int, k2: int) -> Tuple[int, int]:
    for name, value in (("k1", k1), ("k2", k2)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(k1), int(k2)


def _check_block_rows(block_rows: Optional[int]) -> Optional[int]:
    if block_rows is not None and (isinstance(block_rows, bool) or int(block_rows) != block_rows
                                   or block_rows < 1):
        raise ValueError(f"block_rows must be a positive integer or None, got {block_rows!r}")
    return None if block_rows is None else int(block_rows)


def _as_float32(features: torch.Tensor) -> torch.Tensor:
    """Detached contiguous float32 copy-or-view on the same device (the caller's is not touched)."""
    return features.detach().to(torch.float32).contiguous()


def _base_distance(original: ArrayLike, shape: Tuple[int, int], overwrite: bool) -> np.ndarray:
    """The evaluator's distance as a float32 array the result may be written into."""
    if isinstance(original, torch.Tensor):
        original = original.detach().cpu().numpy()
    if not isinstance(original, np.ndarray) or original.shape != shape:
        raise ValueError(f"original_dist must have shape {shape}, got "
                         f"{getattr(original, 'shape', type(original).__name__)}")
    if overwrite:
        if original.dtype != np.float32 or not original.flags.c_contiguous:
            raise ValueError("overwrite_original needs a C-contiguous float32 original_dist")
        return original
    return np.array(original, dtype=np.float32, order="C")


def _rerank(features: torch.Tensor, variant: str, k1: int, k2: int, num_query: Optional[int],
            block_rows: Optional[int], use_faiss: bool = False,
            base: Optional[np.ndarray] = None, lambda_value: float = 0.0) -> np.ndarray:
    """The sparse pipeline. `features`: float32, contiguous, L2-normalized for "original".

    Without `base`: the Jaccard distance (N x N, or the query x gallery block). With `base`
    (query x gallery, float32, ours to overwrite): (1 - lambda) x Jaccard + lambda x base, where
    the original variant fills `base` with its scaled distances first.
    """
    num = features.size(0)
    if variant == "fastreid":  # fast-reid's rank table has k1 columns: windows are cut to k1
        set_width, expansion_width = k1, min(k2, k1)
    else:
        set_width, expansion_width = min(k1 + 1, num), min(k2, num)
    sq_norm = (features * features).sum(dim=1)
    if use_faiss:
        ranks = _knn_ranks(features.cpu().numpy(), k1)
        table, row_max = None, None
    else:
        width = min(num, _TABLE_FACTOR * max(set_width, expansion_width))
        ranks, table_dist, row_max = _neighbour_pass(
            features, sq_norm, width, variant, block_rows,
            num_query if variant == "original" else None, base if variant == "original" else None,
        )
        table = (ranks, table_dist)
    set_ranks = ranks[:, :set_width]
    reciprocal = _k_reciprocal_sets(set_ranks, k1)
    half = _k_reciprocal_sets(set_ranks, int(np.around(k1 / 2)))
    support = _expand(reciprocal, half)
    sq_norm_cpu = sq_norm.cpu().numpy()
    dist = _support_distances(
        support, table,
        lambda rows, cols: _pair_distances(features, sq_norm_cpu, rows, cols, variant),
    )
    if variant == "original":  # the original's float32 scaled distance, as its weights' exponent
        rows = np.repeat(np.arange(num), np.diff(support.indptr))
        dist = dist * dist / row_max[rows]
    weights = _row_softmax(support, dist)
    if k2 != 1:
        weights = _query_expansion(weights, ranks[:, :expansion_width])
    return _jaccard_from_weights(weights.astype(np.float32), num, num_query, base, lambda_value)


def _knn_ranks(features: np.ndarray, k: int) -> np.ndarray:
    """Top-k neighbours, self included, from the exact faiss L2 search of fast-reid's CPU path."""
    import faiss

    index = faiss.IndexFlatL2(features.shape[1])
    index.add(features)
    _, ranks = index.search(features, k)
    if (ranks < 0).any():
        raise ValueError("faiss found fewer than k1 neighbours; are the features finite?")
    return ranks


def _distance_block(features: torch.Tensor, sq_norm: torch.Tensor, start: int, stop: int,
                    col_start: int, col_stop: int, variant: str) -> torch.Tensor:
    """Distances of rows start..stop to rows col_start..col_stop: 1 - cos ("original", normalized
    features) or the squared Euclidean distance ("fastreid", |x|^2 + |y|^2 - 2 x.y like fast-reid).
    """
    block = features[start:stop] @ features[col_start:col_stop].T
    if variant == "original":
        return block.neg_().add_(1.0)
    return (block.mul_(-2.0).add_(sq_norm[None, col_start:col_stop])
            .add_(sq_norm[start:stop, None]))


def _neighbour_pass(features: torch.Tensor, sq_norm: torch.Tensor, width: int, variant: str,
                    block_rows: Optional[int], num_query: Optional[int],
                    scaled: Optional[np.ndarray]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One pass over square blocks on the features' device: each row's `width` nearest (self
    included, nearest first) and their distances; for "original" also each row's maximum squared
    distance (= its column's: the distances are symmetric) and, into `scaled`, the query x gallery
    distances squared and divided by it. No N x N array: a block is `block_rows` x `block_rows`.

    The distances are symmetric, so each block above the diagonal serves its rows and, transposed,
    its columns' rows: half the matrix products of a row-by-row pass. Each row keeps a running
    top-`width`, merged block by block.
    """
    num = features.size(0)
    step = block_rows or max(1, math.isqrt(_BLOCK_ELEMENTS))
    device = features.device
    best = torch.full((num, width), float("inf"), device=device)
    best_index = torch.zeros((num, width), dtype=torch.int64, device=device)
    row_max = torch.zeros(num, device=device)
    original = variant == "original"
    with torch.no_grad():
        for start in range(0, num, step):
            stop = min(start + step, num)
            for col_start in range(start, num, step):
                col_stop = min(col_start + step, num)
                dist = _distance_block(features, sq_norm, start, stop, col_start, col_stop, variant)
                _merge_nearest(best, best_index, start, dist, col_start, width)
                if col_start != start:
                    _merge_nearest(best, best_index, col_start, dist.T, start, width)
                if not original:
                    continue
                square = dist * dist
                row_max[start:stop] = torch.maximum(row_max[start:stop], square.amax(dim=1))
                row_max[col_start:col_stop] = torch.maximum(row_max[col_start:col_stop],
                                                            square.amax(dim=0))
                if scaled is not None:
                    _write_query_gallery(scaled, square, start, col_start, num_query)
                    if col_start != start:
                        _write_query_gallery(scaled, square.T, col_start, start, num_query)
    row_max_cpu = row_max.cpu().numpy()
    if scaled is not None:
        scaled /= row_max_cpu[:num_query, None]
    return best_index.cpu().numpy(), best.cpu().numpy(), row_max_cpu


def _merge_nearest(best: torch.Tensor, best_index: torch.Tensor, row_start: int,
                   dist: torch.Tensor, col_start: int, width: int) -> None:
    """Merge a block's nearest columns into the running top-`width` of its rows, in place."""
    rows = slice(row_start, row_start + dist.size(0))
    nearest = torch.topk(dist, min(width, dist.size(1)), dim=1, largest=False)
    values = torch.cat((best[rows], nearest.values), dim=1)
    indices = torch.cat((best_index[rows], nearest.indices + col_start), dim=1)
    merged = torch.topk(values, width, dim=1, largest=False, sorted=True)
    best[rows] = merged.values
    best_index[rows] = torch.gather(indices, 1, merged.indices)


def _write_query_gallery(scaled: np.ndarray, square: torch.Tensor, row_start: int,
                         col_start: int, num_query: int) -> None:
    """Copy the query-row x gallery-column part of a block of squared distances into `scaled`."""
    row_stop = min(row_start + square.size(0), num_query)
    col_from = max(col_start, num_query)
    col_stop = col_start + square.size(1)
    if row_start >= row_stop or col_from >= col_stop:
        return
    part = square[: row_stop - row_start, col_from - col_start :]
    scaled[row_start:row_stop, col_from - num_query : col_stop - num_query] = part.cpu().numpy()


def _support_distances(support: sp.csr_matrix, table: Optional[Tuple[np.ndarray, np.ndarray]],
                       gather: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """Distance of every (row, member) entry of `support`: looked up in the neighbour table where
    the member is among the row's tabled neighbours, gathered from the features otherwise."""
    num = support.shape[0]
    rows = np.repeat(np.arange(num, dtype=np.int64), np.diff(support.indptr))
    cols = support.indices.astype(np.int64)
    dist = np.empty(cols.size, dtype=np.float32)
    missing = np.ones(cols.size, dtype=bool)
    if table is not None and cols.size:
        ranks, values = table
        order = np.argsort(ranks, axis=1)
        keys = (np.arange(num, dtype=np.int64)[:, None] * num
                + np.take_along_axis(ranks, order, axis=1)).ravel()  # sorted: rows ascend
        probe = rows * num + cols
        pos = np.minimum(np.searchsorted(keys, probe), keys.size - 1)
        found = keys[pos] == probe
        dist[found] = np.take_along_axis(values, order, axis=1).ravel()[pos[found]]
        missing = ~found
    todo = np.flatnonzero(missing)
    if todo.size:
        dist[todo] = gather(rows[todo], cols[todo])
    return dist


def _pair_distances(features: torch.Tensor, sq_norm: np.ndarray, rows: np.ndarray,
                    cols: np.ndarray, variant: str) -> np.ndarray:
    """The variant's distance of each (row, col) pair from gathered dot products (float32)."""
    dot = _pair_dots(features, rows, cols)
    if variant == "original":
        return 1 - dot
    return sq_norm[rows] + sq_norm[cols] - 2 * dot


def _pair_dots(features: torch.Tensor, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """x_r . x_c for each pair, in chunks of reused buffers, on the features' device.

    On the CPU, single-threaded numpy gathers: torch's intra-op threads only slowed these small
    ops down, badly so when other processes share the cores.
    """
    dim = features.size(1)
    step = max(1, _GATHER_ELEMENTS // dim)
    dots = np.empty(rows.size, dtype=np.float32)
    if features.device.type == "cpu":
        feats = features.numpy()
        left = np.empty((step, dim), dtype=np.float32)
        right = np.empty((step, dim), dtype=np.float32)
        for start in range(0, rows.size, step):
            r, c = rows[start : start + step], cols[start : start + step]
            np.take(feats, r, axis=0, out=left[: r.size])
            np.take(feats, c, axis=0, out=right[: r.size])
            dots[start : start + r.size] = np.einsum("ij,ij->i", left[: r.size], right[: r.size])
        return dots
    with torch.no_grad():
        for start in range(0, rows.size, step):
            r = torch.from_numpy(rows[start : start + step]).to(features.device)
            c = torch.from_numpy(cols[start : start + step]).to(features.device)
            dots[start : start + r.numel()] = (features[r] * features[c]).sum(dim=1).cpu().numpy()
    return dots


def _row_softmax(support: sp.csr_matrix, dist: np.ndarray) -> sp.csr_matrix:
    """Row-normalized exp(-distance) over each expanded set (fast-reid's softmax), in float64."""
    num = support.shape[0]
    lengths = np.diff(support.indptr)
    rows = np.repeat(np.arange(num), lengths)
    logits = dist.astype(np.float64)
    row_min = np.zeros(num)
    nonempty = lengths > 0
    if logits.size:
        row_min[nonempty] = np.minimum.reduceat(logits, support.indptr[:-1][nonempty])
    weight = np.exp(row_min[rows] - logits)
    weight /= np.bincount(rows, weights=weight, minlength=num)[rows]
    return sp.csr_matrix((weight, support.indices, support.indptr), shape=(num, num))


def _k_reciprocal_sets(ranks: np.ndarray, k: int) -> sp.csr_matrix:
    """Boolean N x N matrix: j is in row i when j is among i's top k+1 and i among j's.

    fast-reid's `k_reciprocal_neigh` slices `[:k + 1]` of a rank table that has only k1 columns,
    so the window is min(k + 1, k1) wide; the same slice is used here.
    """
    num = ranks.shape[0]
    forward = ranks[:, : k + 1]
    width = forward.shape[1]
    keep = np.empty(forward.shape, dtype=bool)
    step = max(1, _GATHER_ELEMENTS // (width * width))
    for start in range(0, num, step):
        stop = min(start + step, num)
        backward = forward[forward[start:stop]]  # (rows, width, width)
        own = np.arange(start, stop)[:, None, None]
        keep[start:stop] = (backward == own).any(axis=2)
    rows = np.repeat(np.arange(num), width)[keep.ravel()]
    cols = forward.ravel()[keep.ravel()]
    return _bool_csr(rows, cols, num)


def _bool_csr(rows: np.ndarray, cols: np.ndarray, num: int) -> sp.csr_matrix:
    """Sorted, duplicate-free boolean CSR matrix from (row, col) pairs."""
    keys = np.unique(rows.astype(np.int64) * num + cols)
    indptr = np.searchsorted(keys, np.arange(num + 1, dtype=np.int64) * num)
    return sp.csr_matrix(
        (np.ones(keys.size, dtype=bool), (keys % num).astype(np.int64), indptr), shape=(num, num)
    )


def _ragged_arange(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + n) for each (s, n), without a Python loop."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = starts.astype(np.int64) - (np.cumsum(lengths) - lengths)
    return np.repeat(offsets, lengths) + np.arange(total, dtype=np.int64)


def _expand(reciprocal: sp.csr_matrix, half: sp.csr_matrix) -> sp.csr_matrix:
    """Add a candidate's half-size reciprocal set when more than 2/3 of it is already in the set.

    fast-reid: `len(np.intersect1d(H_c, R_i)) > 2 / 3 * len(H_c)` for every candidate c in R_i.
    """
    num = reciprocal.shape[0]
    row_of = np.repeat(np.arange(num), np.diff(reciprocal.indptr))
    candidate = reciprocal.indices
    half_len = np.diff(half.indptr)[candidate]
    members = half.indices[_ragged_arange(half.indptr[candidate], half_len)]
    member_row = np.repeat(row_of, half_len)
    # Membership of each (row, half-set member) in the row's reciprocal set, by sorted keys.
    set_keys = row_of.astype(np.int64) * num + candidate
    probe = member_row.astype(np.int64) * num + members
    pos = np.minimum(np.searchsorted(set_keys, probe), max(set_keys.size - 1, 0))
    found = set_keys[pos] == probe if set_keys.size else np.zeros(probe.size, dtype=bool)
    pair_of_member = np.repeat(np.arange(candidate.size), half_len)
    common = np.bincount(pair_of_member, weights=found, minlength=candidate.size)
    accepted = common > 2 / 3 * half_len
    take = np.repeat(accepted, half_len)
    rows = np.concatenate((row_of, member_row[take]))
    cols = np.concatenate((candidate, members[take]))
    return _bool_csr(rows, cols, num)


def _query_expansion(weights: sp.csr_matrix, neighbours: np.ndarray) -> sp.csr_matrix:
    """Each row replaced by the mean of the rows of its k2 nearest neighbours (self included)."""
    num, width = neighbours.shape
    indptr = np.arange(0, num * width + 1, width)
    average = sp.csr_matrix(
        (np.full(num * width, 1.0 / width), neighbours.ravel(), indptr), shape=(num, num)
    )
    expanded = (average @ weights).tocsr()
    expanded.sort_indices()
    return expanded


def _jaccard_from_weights(weights: sp.csr_matrix, num: int, num_query: Optional[int] = None,
                          base: Optional[np.ndarray] = None,
                          lambda_value: float = 0.0) -> np.ndarray:
    """1 - m / (2 - m), m[i, j] = sum_c min(V[i, c], V[j, c]), clipped at 0, as fast-reid's.

    With `base` (query x gallery float32, overwritten), returns it holding
    Jaccard * (1 - lambda) + base * lambda, in float32 as fast-reid's evaluator computes it.

    m is symmetric (fast-reid's too, bitwise: both sums run over the same columns in the same
    order), so only j >= i is summed and each value is written to (i, j) and (j, i). For a block
    of rows, every non-zero V[i, c] meets the entries of column c at rows j >= i; the mins are
    summed per (i, j) with a bincount in float64. Pairs sharing no column keep distance 1.
    """
    weights.sort_indices()
    weights.eliminate_zeros()
    csr_rows = np.repeat(np.arange(num), np.diff(weights.indptr))
    csr_cols = weights.indices
    values = weights.data
    # CSC view of the same entries, and each CSR entry's position in it.
    order = np.lexsort((csr_rows, csr_cols))
    csc_rows = csr_rows[order]
    csc_values = values[order]
    col_end = np.cumsum(np.bincount(csr_cols, minlength=num))
    position = np.empty(order.size, dtype=np.int64)
    position[order] = np.arange(order.size)
    # Pairs contributed by each CSR entry: the rest of its column, itself included.
    pairs_per_entry = col_end[csr_cols] - position

    # Only the query x gallery block: pairs (i, j), i <= j, with i < num_query <= j, so the rows
    # from num_query on contribute nothing and are not visited.
    block = num_query is not None
    if base is not None:
        out = base
        weight = np.float32(lambda_value)
        jaccard_weight = np.float32(1 - lambda_value)
    else:
        out = np.ones((num_query, num - num_query) if block else (num, num), dtype=np.float32)
    stop = num_query if block else num
    row = 0
    while row < stop:
        block_end = min(_block_end(weights.indptr, pairs_per_entry, row, num), stop)
        lo, hi = weights.indptr[row], weights.indptr[block_end]
        counts = pairs_per_entry[lo:hi]
        partner = _ragged_arange(position[lo:hi], counts)
        mins = np.minimum(np.repeat(values[lo:hi], counts), csc_values[partner])
        width = num - row
        flat = np.repeat((csr_rows[lo:hi] - row) * width - row, counts) + csc_rows[partner]
        summed = np.bincount(flat, weights=mins, minlength=(block_end - row) * width)
        hit = np.flatnonzero(summed > 0)  # a bool scan is faster than a float one
        shared = summed[hit]
        dist = np.maximum(1.0 - shared / (2.0 - shared), 0.0).astype(np.float32)
        i, j = np.divmod(hit, width)
        i += row
        j += row
        if block:
            keep = (j >= num_query) & (i < num_query)
            query, gallery = i[keep], j[keep] - num_query
            if base is None:
                out[query, gallery] = dist[keep]
            else:  # Jaccard 1 where nothing is shared, its value at the hits
                at_hits = out[query, gallery]
                rows = out[row:block_end]
                rows *= weight
                rows += jaccard_weight
                out[query, gallery] = dist[keep] * jaccard_weight + at_hits * weight
        else:
            out[i, j] = dist
            out[j, i] = dist
        row = block_end
    return out


def _block_end(indptr: np.ndarray, pairs_per_entry: np.ndarray, row: int, num: int) -> int:
    """End row of a block whose triplets and dense float64 slab stay within _PAIR_ELEMENTS."""
    max_rows = max(1, _PAIR_ELEMENTS // (num - row))
    stop = min(num, row + max_rows)
    cumulative = np.concatenate(([0], np.cumsum(pairs_per_entry[indptr[row] : indptr[stop]])))
    row_ends = cumulative[indptr[row + 1 : stop + 1] - indptr[row]]
    fits = int(np.searchsorted(row_ends, _PAIR_ELEMENTS, side="right"))
    return row + max(1, min(fits, stop - row))
