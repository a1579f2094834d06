"""Benchmark k-reciprocal re-ranking: fast-reid's faiss CPU path vs `adaptive_l2`'s sparse variants.

All run on the same clustered random features (identities as clusters, L2-normalized as the
cosine evaluator does), each in its own fresh process so that its time and peak RSS are its own:

* fast-reid: `compute_jaccard_distance(..., search_option=3)`, its faiss CPU path (N x N);
* fastreid variant: `adaptive_l2`'s same computation (N x N), checked against fast-reid's;
* original variant: `rerank_distance(..., variant="original")`, the paper's re-ranking, the
  query x gallery distances the evaluation uses (its blocked torch pass runs on the CPU here).

Times and peak memory are printed with their ratios to fast-reid's path; the script exits with
status 1 if the two fastreid-variant results differ by more than 1e-5. `--msmt` times only the
original variant at MSMT17 size (fast-reid's dense path would need two 35 GB matrices).

    python benchmarks/bench_rerank.py            # Market-1501 size: 3368 query x 15913 gallery
    python benchmarks/bench_rerank.py --msmt     # MSMT17 size: 11659 query x 82161 gallery
    python benchmarks/bench_rerank.py --quick    # a few seconds
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, Optional

import numpy as np

TOLERANCE = 1e-5


def clustered_features(
    num: int, dim: int, seed: int, per_identity: float = 20.0, latent: int = 32
) -> np.ndarray:
    """Features of a re-id-like test set: identities are clusters in a low-dimensional latent space.

    Latent identity centres plus per-image variation, lifted to `dim` by a random projection, plus
    isotropic noise, then L2-normalized. Clusters overlap, so that nearest neighbours are mostly,
    not always, of the same identity and the k-reciprocal sets are non-trivial.
    """
    rng = np.random.default_rng(seed)
    num_ids = max(2, int(round(num / per_identity)))
    centres = rng.standard_normal((num_ids, latent))
    identity = rng.integers(0, num_ids, num)
    latent_codes = centres[identity] + 0.9 * rng.standard_normal((num, latent))
    projection = rng.standard_normal((latent, dim)).astype(np.float32) / np.sqrt(latent)
    feats = latent_codes.astype(np.float32) @ projection
    feats += 0.4 * rng.standard_normal((num, dim), dtype=np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    return feats


def _run_one(which: str, features_path: str, out_path: Optional[str], num_query: int, k1: int,
             k2: int) -> Dict[str, float]:
    """Worker (fresh process): time one implementation and record this process's peak RSS."""
    import torch

    import adaptive_l2  # noqa: F401  (fast-reid compatibility patches)
    from adaptive_l2.evaluation.rerank import jaccard_distance, rerank_distance
    from fastreid.utils.compute_dist import compute_jaccard_distance

    features = torch.from_numpy(np.load(features_path))
    base_rss = _peak_rss_gib()
    start = time.perf_counter()
    if which == "fast-reid":
        dist = compute_jaccard_distance(features, k1=k1, k2=k2, search_option=3)
    elif which == "fastreid variant":
        dist = jaccard_distance(features, k1=k1, k2=k2)
    else:
        dist = rerank_distance(features[:num_query], features[num_query:], k1=k1, k2=k2,
                               variant="original")
    seconds = time.perf_counter() - start
    peak_rss = _peak_rss_gib()
    if out_path is not None:
        np.save(out_path, dist)
    return {"seconds": seconds, "peak_rss_gib": peak_rss, "base_rss_gib": base_rss,
            "shape": dist.shape}


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _max_abs_diff(path_a: str, path_b: str, rows_per_chunk: int = 1024) -> float:
    a = np.load(path_a, mmap_mode="r")
    b = np.load(path_b, mmap_mode="r")
    if a.shape != b.shape:
        raise ValueError(f"result shapes differ: {a.shape} vs {b.shape}")
    worst = 0.0
    for start in range(0, a.shape[0], rows_per_chunk):
        chunk = np.abs(a[start : start + rows_per_chunk] - b[start : start + rows_per_chunk])
        worst = max(worst, float(chunk.max()))
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-query", type=int, default=3368)
    parser.add_argument("--num-gallery", type=int, default=15913)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--k1", type=int, default=20)
    parser.add_argument("--k2", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small size (200 x 1000, dim 256)")
    parser.add_argument("--msmt", action="store_true",
                        help="MSMT17 size (11659 x 82161), the original variant only")
    args = parser.parse_args()
    if args.quick:
        args.num_query, args.num_gallery, args.dim = 200, 1000, 256
    if args.msmt:
        args.num_query, args.num_gallery = 11659, 82161
    runs = ("original variant",) if args.msmt else ("fast-reid", "fastreid variant",
                                                     "original variant")

    num = args.num_query + args.num_gallery
    print(
        f"re-ranking N = {args.num_query} query + {args.num_gallery} gallery = {num}, "
        f"dim {args.dim}, k1 {args.k1}, k2 {args.k2}, seed {args.seed}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="bench_rerank_") as tmp:
        features_path = os.path.join(tmp, "features.npy")
        np.save(features_path, clustered_features(num, args.dim, args.seed))
        stats = {}
        for which in runs:
            out_path = None if which == "original variant" else os.path.join(tmp, f"{which}.npy")
            with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                stats[which] = pool.submit(
                    _run_one, which, features_path, out_path, args.num_query, args.k1, args.k2
                ).result()
            s = stats[which]
            ratio = ""
            if "fast-reid" in stats and which != "fast-reid":
                host = stats["fast-reid"]
                ratio = (f"   ratio to fast-reid: time {s['seconds'] / host['seconds']:.3f}, "
                         f"peak {s['peak_rss_gib'] / host['peak_rss_gib']:.3f}")
            print(
                f"{which:>16}: {s['seconds']:8.2f} s   peak RSS {s['peak_rss_gib']:5.2f} GiB "
                f"(features loaded: {s['base_rss_gib']:4.2f} GiB), result "
                f"{s['shape'][0]} x {s['shape'][1]}{ratio}",
                flush=True,
            )
        if "fast-reid" not in stats:
            print(f"load average after: {os.getloadavg()[0]:.2f}")
            return 0
        diff = _max_abs_diff(
            os.path.join(tmp, "fast-reid.npy"), os.path.join(tmp, "fastreid variant.npy")
        )
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(f"fastreid variant vs fast-reid, max abs difference: {diff:.3g} "
          f"(tolerance {TOLERANCE:g})")
    if diff > TOLERANCE:
        print("FAIL: results differ beyond the tolerance")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
