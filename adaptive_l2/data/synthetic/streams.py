"""The independent random streams of the synthetic generator: every draw comes from its own
``numpy.random.Generator(PCG64(...))`` keyed by (seed, purpose, index), so the output is a pure
function of the arguments."""
from __future__ import annotations

import numpy as np


# Purposes of the independent random streams.
(STREAM_LAYOUT, STREAM_IDENTITY, STREAM_CAMERA, STREAM_IMAGE, STREAM_DISTRACTOR,
 STREAM_SCENE) = range(6)


def random_stream(seed: int, stream: int, index: int = 0) -> np.random.Generator:
    """An independent generator per (seed, purpose, index): draws never depend on call order."""
    sequence = np.random.SeedSequence(seed, spawn_key=(stream, index))
    return np.random.Generator(np.random.PCG64(sequence))
