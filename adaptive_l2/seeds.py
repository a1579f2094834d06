"""Seeds derived from keys: one helper for every stream the project keys by position.

Why keyed streams: a random stream seeded from (seed, batch, position) or (seed, iteration) needs
no saved state, so a resumed run, or k processes, draw what one uninterrupted process draws.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def derived_seed(keys: Sequence[int], bits: int = 32) -> int:
    """A well-mixed non-negative seed from integer `keys` (numpy's SeedSequence).

    bits=32 suits numpy and Python's `random` (numpy's limit); bits=63 suits
    `torch.Generator.manual_seed`. The first key is taken modulo 2**32, as numpy requires."""
    if bits not in (32, 63):
        raise ValueError(f"bits must be 32 or 63, got {bits!r}")
    words = [int(keys[0]) & 0xFFFFFFFF, *(int(key) for key in keys[1:])]
    state = np.random.SeedSequence(words)
    if bits == 32:
        return int(state.generate_state(1, dtype=np.uint32)[0])
    return int(state.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
