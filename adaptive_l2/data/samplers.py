"""Identity sampling of the paper: P identities x K images, never an identity with fewer than K.

fast-reid's NaiveIdentitySampler pads identities with fewer than K images by sampling with
replacement; the paper's Keras code never samples them at all.
"""
from __future__ import annotations

import itertools
from collections import defaultdict
from typing import Iterator, List, Sequence

import numpy as np
from fastreid.utils import comm


class StrictIdentitySampler:
    """Infinite stream of indices, batch by batch: P identities (each with >= K images), K images
    each, all without replacement inside a batch. Every process draws its own batches from one
    shared seed (rank r takes batch r, r + world, ...)."""

    def __init__(self, data_source: Sequence, mini_batch_size: int, num_instances: int,
                 seed: int | None = None):
        if mini_batch_size % num_instances:
            raise ValueError(f"SOLVER.IMS_PER_BATCH per process ({mini_batch_size}) must be a "
                             f"multiple of DATALOADER.NUM_INSTANCE ({num_instances})")
        self.num_instances = num_instances
        self.num_identities_per_batch = mini_batch_size // num_instances
        by_identity = defaultdict(list)
        for index, item in enumerate(data_source):
            by_identity[item[1]].append(index)
        self.pools: List[List[int]] = [idx for _, idx in sorted(by_identity.items())
                                       if len(idx) >= num_instances]
        if len(self.pools) < self.num_identities_per_batch:
            raise ValueError(
                f"only {len(self.pools)} identities have >= {num_instances} images; a batch needs "
                f"{self.num_identities_per_batch} (lower SOLVER.IMS_PER_BATCH)")
        self.seed = int(comm.shared_random_seed() if seed is None else seed)
        self.rank = comm.get_rank()
        self.world_size = comm.get_world_size()

    def batches(self) -> Iterator[List[int]]:
        rng = np.random.default_rng(self.seed)
        while True:
            chosen = rng.choice(len(self.pools), self.num_identities_per_batch, replace=False)
            batch = []
            for identity in chosen:
                pool = self.pools[identity]
                batch.extend(int(pool[i]) for i in rng.choice(len(pool), self.num_instances,
                                                              replace=False))
            yield batch

    def __iter__(self) -> Iterator[int]:
        mine = itertools.islice(self.batches(), self.rank, None, self.world_size)
        for batch in mine:
            yield from batch
