"""Identity sampling of the paper: P identities x K images, never an identity with fewer than K.

fast-reid's NaiveIdentitySampler pads identities with fewer than K images by sampling with
replacement; the paper's Keras code never samples them at all. `StrictIdentitySampler` picks
identities uniformly and K images afresh per batch; `ChunkedIdentitySampler` is the original's
round-based draw (identities in proportion to their chunks of K, no image twice in a round).
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


class ChunkedIdentitySampler:
    """The original Keras code's P x K sampler, round by round.

    Each round every identity with at least K images has its images shuffled and cut into disjoint
    chunks of K (the remainder is dropped); each batch takes P identities uniformly among those
    with chunks left and pops one chunk from each; the round ends when fewer than P identities
    have chunks. Identities are thus drawn in proportion to their number of chunks, no image repeats
    within a round, and identities with fewer than K images are never drawn.

    `batches()` is a pure function of the data and the seed: it yields GLOBAL batches of
    `batch_size` (SOLVER.IMS_PER_BATCH) dataset indices forever.
    """

    def __init__(self, data_source: Sequence, batch_size: int, num_instances: int,
                 seed: int | None = None):
        if num_instances < 1 or batch_size < 1 or batch_size % num_instances:
            raise ValueError(f"SOLVER.IMS_PER_BATCH ({batch_size}) must be a positive multiple of "
                             f"DATALOADER.NUM_INSTANCE ({num_instances})")
        self.batch_size = batch_size
        self.num_instances = num_instances
        self.num_identities_per_batch = batch_size // num_instances
        by_identity: dict = {}
        for index, item in enumerate(data_source):
            by_identity.setdefault(item[1], []).append(index)
        # identities in order of first appearance: deterministic for a given dataset order
        self.pools: List[np.ndarray] = [np.asarray(indices) for indices in by_identity.values()
                                        if len(indices) >= num_instances]
        if len(self.pools) < self.num_identities_per_batch:
            raise ValueError(
                f"only {len(self.pools)} of {len(by_identity)} identities have >= "
                f"DATALOADER.NUM_INSTANCE ({num_instances}) images; SOLVER.IMS_PER_BATCH "
                f"({batch_size}) needs {self.num_identities_per_batch} per batch: lower "
                "SOLVER.IMS_PER_BATCH or DATALOADER.NUM_INSTANCE")
        self.seed = int(comm.shared_random_seed() if seed is None else seed)
        self.rank = comm.get_rank()
        self.world_size = comm.get_world_size()

    def _round_chunks(self, rng: np.random.Generator) -> List[List[np.ndarray]]:
        """Every eligible identity's images shuffled and cut into chunks of K (remainder dropped)."""
        chunks = []
        for pool in self.pools:
            shuffled = rng.permutation(pool)
            num_chunks = len(shuffled) // self.num_instances
            chunks.append(np.split(shuffled[:num_chunks * self.num_instances], num_chunks))
        return chunks

    def rounds(self) -> Iterator[List[List[int]]]:
        """One list of global batches per round, forever, all drawn from one seeded generator."""
        rng = np.random.default_rng(self.seed)
        while True:
            chunks = self._round_chunks(rng)
            active = list(range(len(chunks)))  # identities with chunks left
            batches = []
            while len(active) >= self.num_identities_per_batch:
                picks = rng.choice(len(active), self.num_identities_per_batch, replace=False)
                batch = []
                for identity in [active[i] for i in picks]:
                    batch.extend(int(i) for i in chunks[identity].pop())
                active = [identity for identity in active if chunks[identity]]
                batches.append(batch)
            yield batches

    def batches(self) -> Iterator[List[int]]:
        """Global batches of SOLVER.IMS_PER_BATCH indices, round after round, forever."""
        for batches in self.rounds():
            yield from batches

    def __iter__(self) -> Iterator[int]:
        mine = itertools.islice(self.batches(), self.rank, None, self.world_size)
        for batch in mine:
            yield from batch
