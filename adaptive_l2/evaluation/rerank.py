"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) that runs on CPU in sparse form.

fast-reid's `fastreid.utils.compute_dist.compute_jaccard_distance` builds two dense N x N float32
matrices (the neighbour weights V and their query expansion) and fills them, and the Jaccard
distance, row by row in Python loops: at Market-1501 size (N = 19281) that is minutes of CPU and
several GB. Every row of V has only a few dozen non-zeros, so this module keeps V sparse and
vectorizes each step, and reproduces fast-reid's result:

* the neighbour ranks come from the same faiss `IndexFlatL2` search (top-k1, self included, ties
  in faiss's order), so every neighbour set is exactly fast-reid's;
* the k-reciprocal sets, the 2/3 expansion rule and the k2 query expansion are integer/set
  operations and are exact;
* the Gaussian-kernel weights, the query-expansion means and the min-sums are floating point and
  agree to rounding only (see :func:`jaccard_distance`).

The only dense N x N array is the returned distance matrix.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np
import scipy.sparse as sp
import torch

ArrayLike = Union[torch.Tensor, np.ndarray]

__all__ = ["jaccard_distance", "rerank_distance"]

# Sizes (elements) of the temporary arrays of the vectorized steps. They are kept to a few MB on
# purpose: arrays of that size are recycled by the allocator, while larger fresh arrays pay a page
# fault per 4 KiB on first touch, which made the steps several times slower on a 2-core VM.
_GATHER_ELEMENTS = 1 << 21  # neighbour-of-neighbour rank tables, gathered feature rows
_PAIR_ELEMENTS = 1 << 20  # (row, row, min) triplets and the dense slab of one Jaccard block


def jaccard_distance(features: torch.Tensor, k1: int = 20, k2: int = 6,
                     num_query: Optional[int] = None) -> np.ndarray:
    """Jaccard distance of k-reciprocal neighbour sets; N x N float32, like fast-reid's, or, with
    `num_query` (features = queries then gallery), only the num_query x (N - num_query) block the
    evaluation uses: at MSMT17 size (N = 93820) the full matrix alone would take 35 GB.

    Same result as `compute_jaccard_distance(features, k1, k2, search_option=3)` (faiss CPU),
    several times faster and in less memory: the neighbour sets are identical and the
    distances agree to float32 rounding (max abs difference about 1e-6 at Market-1501 size).
    Bitwise equality is impossible: the squared distances, softmax weights, query-expansion means
    and min-sums are summed in another order, and the sums here are float64 where fast-reid's are
    float32 (so these are the closer to the exact values).

    CUDA features go to fast-reid's own faiss GPU path when faiss has GPUs; with a CPU-only faiss,
    which cannot search CUDA memory, they are copied to the CPU and take the CPU path.
    """
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if features.dim() != 2:
        raise ValueError(f"features must be 2-D (N x dim), got shape {tuple(features.shape)}")
    k1, k2 = _check_ks(k1, k2)
    num = features.size(0)
    if num < k1:
        raise ValueError(
            f"k-reciprocal re-ranking needs at least k1={k1} samples (query + gallery), got {num}"
        )
    if num_query is not None and not 0 < num_query < num:
        raise ValueError(f"num_query must be in 1 .. {num - 1}, got {num_query}")
    if features.is_cuda and _faiss_has_gpus():
        from fastreid.utils.compute_dist import compute_jaccard_distance

        full = compute_jaccard_distance(features, k1=k1, k2=k2, search_option=0)
        return full if num_query is None else full[:num_query, num_query:]
    feats = features.detach().to("cpu", torch.float32).contiguous().numpy()
    return _jaccard_distance_cpu(feats, k1, k2, num_query)


def rerank_distance(
    query_features: ArrayLike,
    gallery_features: ArrayLike,
    original_dist: ArrayLike,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
) -> np.ndarray:
    """Re-ranked query x gallery distance, combined exactly as fast-reid's `ReidEvaluator` does.

    `jaccard * (1 - lambda_value) + original_dist * lambda_value`, the Jaccard part computed on the
    concatenated query and gallery features. The features are used as given: for the cosine
    metric pass them L2-normalized, as the evaluator does before re-ranking.
    """
    query = torch.as_tensor(query_features)
    gallery = torch.as_tensor(gallery_features)
    if query.dim() != 2 or gallery.dim() != 2 or query.size(1) != gallery.size(1):
        raise ValueError(
            "query and gallery features must be 2-D with the same dimension, got "
            f"{tuple(query.shape)} and {tuple(gallery.shape)}"
        )
    original = original_dist
    if isinstance(original, torch.Tensor):
        original = original.detach().cpu().numpy()
    original = np.asarray(original)
    expected = (query.size(0), gallery.size(0))
    if original.shape != expected:
        raise ValueError(f"original_dist must have shape {expected}, got {original.shape}")
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"lambda_value must be in [0, 1], got {lambda_value}")
    if gallery.device != query.device:
        gallery = gallery.to(query.device)
    jaccard = jaccard_distance(torch.cat((query, gallery), dim=0), k1=k1, k2=k2,
                               num_query=expected[0])
    return jaccard * (1 - lambda_value) + original * lambda_value


def _check_ks(k1: int, k2: int) -> Tuple[int, int]:
    for name, value in (("k1", k1), ("k2", k2)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(k1), int(k2)


def _faiss_has_gpus() -> bool:
    import faiss

    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    return get_num_gpus is not None and get_num_gpus() > 0


def _jaccard_distance_cpu(features: np.ndarray, k1: int, k2: int,
                         num_query: Optional[int] = None) -> np.ndarray:
    """The sparse pipeline on contiguous float32 features; each step mirrors one of fast-reid's."""
    num = features.shape[0]
    ranks = _knn_ranks(features, k1)
    reciprocal = _k_reciprocal_sets(ranks, k1)
    half = _k_reciprocal_sets(ranks, int(np.around(k1 / 2)))
    expanded = _expand(reciprocal, half)
    weights = _gaussian_weights(features, expanded)
    if k2 != 1:
        weights = _query_expansion(weights, ranks[:, :k2])
    return _jaccard_from_weights(weights.astype(np.float32), num, num_query)


def _knn_ranks(features: np.ndarray, k: int) -> np.ndarray:
    """Top-k neighbours, self included, from the exact faiss L2 search of fast-reid's CPU path."""
    import faiss

    index = faiss.IndexFlatL2(features.shape[1])
    index.add(features)
    _, ranks = index.search(features, k)
    if (ranks < 0).any():
        raise ValueError("faiss found fewer than k1 neighbours; are the features finite?")
    return ranks


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


def _gaussian_weights(features: np.ndarray, support: sp.csr_matrix) -> sp.csr_matrix:
    """Row-normalized exp(-squared distance) over each expanded set (fast-reid's softmax), float64.

    Squared distances are formed like fast-reid's, |x|^2 + |y|^2 - 2 x.y in float32, so they carry
    the same cancellation; the softmax is then taken in float64.
    """
    num, dim = features.shape
    lengths = np.diff(support.indptr)
    rows = np.repeat(np.arange(num), lengths)
    cols = support.indices
    sq_norm = np.einsum("ij,ij->i", features, features)
    dist = np.empty(cols.size, dtype=np.float32)
    # Single-threaded numpy gathers into reused buffers: torch's intra-op threads only slowed
    # these small ops down, badly so when other processes share the cores.
    step = max(1, _GATHER_ELEMENTS // dim)
    left = np.empty((step, dim), dtype=np.float32)
    right = np.empty((step, dim), dtype=np.float32)
    for start in range(0, cols.size, step):
        r, c = rows[start : start + step], cols[start : start + step]
        size = r.size
        np.take(features, r, axis=0, out=left[:size])
        np.take(features, c, axis=0, out=right[:size])
        dot = np.einsum("ij,ij->i", left[:size], right[:size])
        dist[start : start + size] = sq_norm[r] + sq_norm[c] - 2 * dot
    # Softmax of -dist within each row: subtract the row minimum, exponentiate, normalize.
    logits = dist.astype(np.float64)
    row_min = np.zeros(num)
    nonempty = lengths > 0
    if logits.size:
        row_min[nonempty] = np.minimum.reduceat(logits, support.indptr[:-1][nonempty])
    weight = np.exp(row_min[rows] - logits)
    weight /= np.bincount(rows, weights=weight, minlength=num)[rows]
    return sp.csr_matrix((weight, support.indices, support.indptr), shape=(num, num))


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


def _jaccard_from_weights(weights: sp.csr_matrix, num: int,
                          num_query: Optional[int] = None) -> np.ndarray:
    """1 - m / (2 - m), m[i, j] = sum_c min(V[i, c], V[j, c]), clipped at 0, as fast-reid's.

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
            out[i[keep], j[keep] - num_query] = dist[keep]
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
