"""k-reciprocal re-ranking (Zhong et al. 2017) on CPU or GPU."""
from __future__ import annotations

import numpy as np
import torch


def jaccard_distance(features: torch.Tensor, k1: int = 20, k2: int = 6) -> np.ndarray:
    """Jaccard distance of k-reciprocal neighbour sets, as fast-reid's `compute_jaccard_distance`.

    Uses fast-reid's faiss GPU path when the features are on a GPU, its faiss CPU path otherwise.
    """
    from fastreid.utils.compute_dist import compute_jaccard_distance

    search_option = 0 if features.is_cuda else 3
    return compute_jaccard_distance(features, k1=k1, k2=k2, search_option=search_option)
