"""The original Keras code's data pipeline for the paper rows: the round-based P x K sampler,
its random erasing and its OpenCV bilinear resize, each checked against a statistic or a hand
computation written from the protocol (not from the implementation)."""
from collections import Counter

import numpy as np
import pytest

from adaptive_l2.data.samplers import ChunkedIdentitySampler


def identity_items(counts):
    """Dataset items (path, pid, camid) with counts[pid] images for each identity."""
    return [(f"img_{pid}_{i}", pid, 0) for pid, count in enumerate(counts) for i in range(count)]


def test_chunked_sampler_draws_identities_in_proportion_to_their_chunks():
    # 10 identities with 40 images (10 chunks of 4), 10 with 4 (1 chunk), 5 with 3 (never drawn)
    counts = [40] * 10 + [4] * 10 + [3] * 5
    items = identity_items(counts)
    sampler = ChunkedIdentitySampler(items, batch_size=8, num_instances=4, seed=0)
    draws, num_rounds = Counter(), 300
    rounds = sampler.rounds()
    for _ in range(num_rounds):
        for batch in next(rounds):
            draws.update(items[i][1] for i in batch[::4])
    big = np.mean([draws[pid] for pid in range(10)]) / num_rounds
    small = np.mean([draws[pid] for pid in range(10, 20)]) / num_rounds
    # a round uses every chunk but at most the last identity's leftovers: 10 and 1 per round
    assert 9.5 < big <= 10 and small == pytest.approx(1.0, abs=0.02)
    assert 9.5 < big / small < 10.3
    assert not any(draws[pid] for pid in range(20, 25))


def test_chunked_sampler_never_repeats_an_image_within_a_round_and_keeps_k_per_identity():
    counts = [2, 3, 4, 5, 6, 8, 4, 1, 7, 4, 13, 9]
    items = identity_items(counts)
    sampler = ChunkedIdentitySampler(items, batch_size=12, num_instances=4, seed=3)
    eligible = {pid for pid, count in enumerate(counts) if count >= 4}
    rounds = sampler.rounds()
    seen_images = set()
    for _ in range(40):
        round_batches = next(rounds)
        flat = [i for batch in round_batches for i in batch]
        assert len(flat) == len(set(flat))  # no image twice within a round
        per_identity = Counter(items[i][1] for i in flat)
        # every identity draws at most its chunks, whole chunks of K only
        assert all(per_identity[pid] <= counts[pid] // 4 * 4 for pid in per_identity)
        assert set(per_identity) <= eligible
        for batch in round_batches:
            assert len(batch) == 12
            pids = [items[i][1] for i in batch]
            groups = [pids[4 * k: 4 * (k + 1)] for k in range(3)]
            assert all(len(set(group)) == 1 for group in groups)
            assert len({group[0] for group in groups}) == 3  # P distinct identities
        seen_images |= set(flat)
    # the remainder dropped differs between rounds: over many rounds every image shows up
    assert seen_images == {i for i, item in enumerate(items) if item[1] in eligible}


def test_chunked_sampler_round_ends_when_fewer_than_p_identities_have_chunks():
    # identity 0 has 2 chunks, 1 and 2 one each; P = 2 picked uniformly among those with chunks
    # left. With probability 1/3 the first batch is {1, 2}: identity 0 is then alone, the round
    # ends after one batch and its chunks are dropped; otherwise 0 pairs with both (2 batches).
    items = identity_items([8, 4, 4])
    rounds = ChunkedIdentitySampler(items, batch_size=8, num_instances=4, seed=1).rounds()
    short = 0
    for _ in range(900):
        round_batches = next(rounds)
        pids = [sorted({items[i][1] for i in batch}) for batch in round_batches]
        assert pids in ([[1, 2]], [[0, 1], [0, 2]], [[0, 2], [0, 1]])
        short += len(round_batches) == 1
    assert short / 900 == pytest.approx(1 / 3, abs=0.05)  # 3.5 standard deviations


def test_chunked_sampler_is_a_pure_function_of_its_seed():
    items = identity_items([5, 9, 4, 12, 7, 4, 6])
    def first(seed, n=30):
        stream = ChunkedIdentitySampler(items, batch_size=8, num_instances=4, seed=seed).batches()
        return [next(stream) for _ in range(n)]
    assert first(7) == first(7)
    assert first(7) != first(8)
    sampler = ChunkedIdentitySampler(items, batch_size=8, num_instances=4, seed=7)
    stream = iter(sampler)  # one process: the flat index stream is the batches one after another
    assert [next(stream) for _ in range(8 * 30)] == [i for batch in first(7) for i in batch]


def test_chunked_sampler_refuses_impossible_settings_naming_the_keys():
    items = identity_items([4, 4, 3, 8])
    with pytest.raises(ValueError, match=r"SOLVER.IMS_PER_BATCH \(10\).*NUM_INSTANCE \(4\)"):
        ChunkedIdentitySampler(items, batch_size=10, num_instances=4, seed=0)
    with pytest.raises(ValueError, match=r"only 3 of 4 identities.*NUM_INSTANCE \(4\).*needs 4"):
        ChunkedIdentitySampler(items, batch_size=16, num_instances=4, seed=0)
    with pytest.raises(ValueError, match="NUM_INSTANCE"):
        ChunkedIdentitySampler(items, batch_size=8, num_instances=0, seed=0)
