"""Training samplers that make one experiment of every run: one process or k, resumed or not.

A sampler here draws GLOBAL batches (SOLVER.IMS_PER_BATCH images) from one seeded stream, the
same whatever the number of processes; process r of k takes the r-th of k equal slices of each
global batch, so k processes together see exactly the images one process would see at that
iteration, and batch-hard mining / BatchNorm can run over the global batch (see
`adaptive_l2.global_batch`). Each sample carries a seed derived from (sampler seed, batch
number, position in the global batch): the data pipeline seeds its random augmentation with it
(`SeededSampleDataset`), so augmentation depends neither on the number of processes nor on
data-loader workers nor on a resume. A resumed run starts the stream at the batch it stopped at
(`start_at_batch`).

`ChunkedIdentitySampler`: the original Keras code's P x K rounds (the paper rows' default).
`StrictIdentitySampler`: P identities x K images per batch, identities chosen uniformly among
those with >= K images, images drawn afresh per batch (no repeat inside a batch). fast-reid's
NaiveIdentitySampler pads identities with fewer than K images with repeats; the paper's Keras
code never samples them.
"""
from __future__ import annotations

import itertools
from collections import defaultdict
from typing import Iterator, List, Optional, Sequence

import numpy as np
from fastreid.utils import comm

from adaptive_l2.seeds import derived_seed


class SampleRef(int):
    """A dataset index that also carries the seed of its random augmentation.

    An `int`, so code that indexes with it (fast-reid's datasets, tests) is unchanged; the
    seed survives pickling into data-loader workers."""

    seed: Optional[int]

    def __new__(cls, index: int, seed: Optional[int] = None):
        ref = super().__new__(cls, index)
        ref.seed = seed
        return ref

    def __reduce__(self):
        return (SampleRef, (int(self), self.seed))


def sample_seed(sampler_seed: int, batch_number: int, position: int) -> int:
    """A well-mixed 32-bit seed (numpy's limit) for one sample of one global batch."""
    return derived_seed([sampler_seed, batch_number, position], bits=32)


def process_slice(global_batch_size: int, num_instances: int, rank: int,
                  world_size: int) -> slice:
    """The part of every global batch that process `rank` trains on: whole identities each."""
    if global_batch_size % world_size:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH ({global_batch_size}) cannot be split evenly between "
            f"{world_size} processes")
    per_process = global_batch_size // world_size
    if num_instances and per_process % num_instances:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH ({global_batch_size}) split between {world_size} processes "
            f"gives {per_process} images per process, not a whole number of identities of "
            f"DATALOADER.NUM_INSTANCE ({num_instances}) images: choose IMS_PER_BATCH a multiple "
            f"of NUM_INSTANCE x {world_size}")
    return slice(rank * per_process, (rank + 1) * per_process)


class GlobalBatchSampler:
    """Base of the project's samplers: a seeded stream of global batches, split by process.

    Subclasses implement `batches()`, an infinite deterministic generator of global batches
    (lists of `global_batch_size` dataset indices)."""

    def __init__(self, global_batch_size: int, num_instances: int, seed: Optional[int] = None,
                 rank: Optional[int] = None, world_size: Optional[int] = None):
        self.global_batch_size = int(global_batch_size)
        self.num_instances = int(num_instances)
        self.seed = int(comm.shared_random_seed() if seed is None else seed)
        self.rank = comm.get_rank() if rank is None else rank
        self.world_size = comm.get_world_size() if world_size is None else world_size
        self.slice = process_slice(self.global_batch_size, self.num_instances, self.rank,
                                   self.world_size)
        self.start_batch = 0

    def batches(self) -> Iterator[List[int]]:
        raise NotImplementedError

    def start_at_batch(self, batch_number: int) -> None:
        """Continue the stream at global batch `batch_number` (a resumed run's iteration)."""
        self.start_batch = int(batch_number)

    def __iter__(self) -> Iterator[SampleRef]:
        stream = itertools.islice(self.batches(), self.start_batch, None)
        for number, batch in enumerate(stream, start=self.start_batch):
            for position in range(self.slice.start, self.slice.stop):
                yield SampleRef(batch[position], sample_seed(self.seed, number, position))


def identity_pools(data_source: Sequence, num_instances: int) -> List[List[int]]:
    """Dataset indices per identity (sorted by identity), identities with >= K images only."""
    by_identity = defaultdict(list)
    for index, item in enumerate(data_source):
        by_identity[item[1]].append(index)
    return [indices for _, indices in sorted(by_identity.items()) if len(indices) >= num_instances]


def check_identity_batch(pools: List[List[int]], global_batch_size: int, num_instances: int,
                         total_identities: int) -> int:
    """P = IMS_PER_BATCH / NUM_INSTANCE identities per batch, or an error naming both keys."""
    if num_instances <= 0 or global_batch_size % num_instances:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH ({global_batch_size}) must be a multiple of "
            f"DATALOADER.NUM_INSTANCE ({num_instances})")
    identities_per_batch = global_batch_size // num_instances
    if len(pools) < identities_per_batch:
        raise ValueError(
            f"only {len(pools)} of {total_identities} identities have >= DATALOADER.NUM_INSTANCE "
            f"({num_instances}) images; SOLVER.IMS_PER_BATCH ({global_batch_size}) needs "
            f"{identities_per_batch} per batch: lower SOLVER.IMS_PER_BATCH or NUM_INSTANCE")
    return identities_per_batch


class StrictIdentitySampler(GlobalBatchSampler):
    """P identities (each with >= K images) x K images each, uniformly, without replacement
    inside a batch."""

    def __init__(self, data_source: Sequence, global_batch_size: int, num_instances: int,
                 seed: Optional[int] = None, rank: Optional[int] = None,
                 world_size: Optional[int] = None):
        self.pools = identity_pools(data_source, num_instances)
        self.identities_per_batch = check_identity_batch(
            self.pools, global_batch_size, num_instances,
            len({item[1] for item in data_source}))
        super().__init__(global_batch_size, num_instances, seed, rank, world_size)

    def batches(self) -> Iterator[List[int]]:
        rng = np.random.default_rng(self.seed)
        while True:
            chosen = rng.choice(len(self.pools), self.identities_per_batch, replace=False)
            batch = []
            for identity in chosen:
                pool = self.pools[identity]
                batch.extend(int(pool[i]) for i in rng.choice(len(pool), self.num_instances,
                                                              replace=False))
            yield batch


class ChunkedIdentitySampler(GlobalBatchSampler):
    """The original Keras code's P x K sampler, round by round.

    Each round every identity with at least K images has its images shuffled and cut into
    disjoint chunks of K (the remainder is dropped); each batch takes P identities uniformly among
    those with chunks left and pops one chunk from each; the round ends when fewer than P
    identities have chunks. Identities are thus drawn in proportion to their number of chunks, no
    image repeats within a round, and identities with fewer than K images are never drawn.
    """

    def __init__(self, data_source: Sequence, global_batch_size: int, num_instances: int,
                 seed: Optional[int] = None, rank: Optional[int] = None,
                 world_size: Optional[int] = None):
        self.pools = [np.asarray(pool) for pool in identity_pools(data_source, num_instances)]
        self.identities_per_batch = check_identity_batch(
            self.pools, global_batch_size, num_instances,
            len({item[1] for item in data_source}))
        super().__init__(global_batch_size, num_instances, seed, rank, world_size)

    def _round_chunks(self, rng: np.random.Generator) -> List[List[np.ndarray]]:
        """Every eligible identity's images shuffled, cut into chunks of K (remainder dropped)."""
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
            while len(active) >= self.identities_per_batch:
                picks = rng.choice(len(active), self.identities_per_batch, replace=False)
                batch = []
                for identity in [active[i] for i in picks]:
                    batch.extend(int(i) for i in chunks[identity].pop())
                active = [identity for identity in active if chunks[identity]]
                batches.append(batch)
            yield batches

    def batches(self) -> Iterator[List[int]]:
        for batches in self.rounds():
            yield from batches


class PositionSeededSampler:
    """fast-reid's own samplers (which stream per process), made resumable and seeded per sample.

    Skips the samples a resumed run has already trained on, and gives each sample a seed from
    (sampler seed, rank, position in this process's stream). It does not make k processes the
    same experiment as one: only the project's samplers do."""

    def __init__(self, sampler, per_process_batch: int, seed: int, rank: int):
        self.sampler = sampler
        self.per_process_batch = per_process_batch
        self.seed = int(seed)
        self.rank = rank
        self.start_batch = 0

    def start_at_batch(self, batch_number: int) -> None:
        self.start_batch = int(batch_number)

    def __iter__(self) -> Iterator[SampleRef]:
        skip = self.start_batch * self.per_process_batch
        for position, index in enumerate(itertools.islice(iter(self.sampler), skip, None),
                                         start=skip):
            yield SampleRef(index, sample_seed(self.seed, self.rank, position))
