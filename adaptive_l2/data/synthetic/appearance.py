"""Who a synthetic person is: clothing colours and patterns, build, hair, skin, hat, bag, drawn
from street-like frequencies, and near-duplicate identities (same top, other trousers...)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from adaptive_l2.data.synthetic.streams import STREAM_IDENTITY, random_stream


Colour = Tuple[float, float, float]

# Clothing palette (RGB 0-255) with how often each colour is worn on top / on the legs: dark and
# neutral colours dominate, as in real street scenes, so many people share a colour.
_PALETTE = np.array([
    (28, 28, 30),     # black
    (72, 72, 76),     # dark grey
    (135, 135, 138),  # grey
    (226, 226, 222),  # white
    (32, 42, 88),     # navy
    (52, 92, 172),    # blue
    (135, 172, 212),  # light blue
    (172, 32, 38),    # red
    (102, 28, 40),    # maroon
    (222, 142, 172),  # pink
    (222, 122, 42),   # orange
    (222, 202, 62),   # yellow
    (42, 112, 52),    # green
    (102, 112, 52),   # olive
    (192, 172, 132),  # beige
    (112, 76, 46),    # brown
    (102, 62, 132),   # purple
    (32, 122, 122),   # teal
    (62, 82, 122),    # denim
], dtype=np.float64)
UPPER_WEIGHTS = np.array(
    [3.0, 2.0, 1.5, 2.5, 1.5, 1.3, 1.0, 1.0, 0.7, 0.7, 0.6, 0.6, 0.8, 0.6, 1.0, 0.8, 0.6, 0.5, 0.5])
LOWER_WEIGHTS = np.array(
    [4.0, 2.0, 1.5, 0.6, 1.8, 0.8, 0.4, 0.3, 0.3, 0.2, 0.1, 0.1, 0.4, 0.6, 1.5, 1.0, 0.2, 0.2, 3.0])
_SKIN = np.array([(236, 196, 168), (218, 170, 132), (190, 140, 100), (150, 102, 70), (98, 66, 46)],
                 dtype=np.float64)
_HAIR = np.array([(20, 16, 14), (52, 36, 26), (96, 66, 40), (178, 150, 96), (150, 148, 146)],
                 dtype=np.float64)
_HAIR_WEIGHTS = np.array([5.0, 3.0, 1.5, 0.8, 0.7])

_UPPER_PATTERNS = ("solid", "hstripes", "vstripes", "checks", "logo", "two_tone", "band")
_UPPER_PATTERN_WEIGHTS = np.array([0.36, 0.14, 0.08, 0.10, 0.14, 0.09, 0.09])
_LOWER_PATTERNS = ("trousers", "shorts", "skirt", "side_stripe", "checks")
_LOWER_PATTERN_WEIGHTS = np.array([0.58, 0.15, 0.10, 0.11, 0.06])
_HAIR_STYLES = ("short", "long", "bald")
_HAIR_STYLE_WEIGHTS = np.array([0.55, 0.37, 0.08])
_BAGS = ("none", "backpack", "shoulder", "handbag")
_BAG_WEIGHTS = np.array([0.45, 0.25, 0.18, 0.12])
VIEWS = ("front", "back", "side")
VIEW_WEIGHTS = np.array([0.4, 0.4, 0.2])


def pick(rng: np.random.Generator, options: Sequence[str], weights: np.ndarray) -> str:
    return options[int(rng.choice(len(options), p=weights / weights.sum()))]


def palette_colour(rng: np.random.Generator, weights: np.ndarray,
                    exclude: Optional[int] = None) -> Tuple[int, Colour]:
    """A palette colour (index, RGB in 0..1) with per-person jitter, so equal names differ a bit."""
    w = weights.copy()
    if exclude is not None:
        w[exclude] = 0.0
    idx = int(rng.choice(len(w), p=w / w.sum()))
    rgb = _PALETTE[idx] * rng.uniform(0.85, 1.15) + rng.normal(0.0, 8.0, 3)
    return idx, tuple(float(c) for c in np.clip(rgb, 0, 255) / 255.0)


def _table_colour(rng: np.random.Generator, table: np.ndarray,
                  weights: Optional[np.ndarray] = None) -> Colour:
    p = None if weights is None else weights / weights.sum()
    rgb = table[int(rng.choice(len(table), p=p))] * rng.uniform(0.9, 1.1) + rng.normal(0.0, 5.0, 3)
    return tuple(float(c) for c in np.clip(rgb, 0, 255) / 255.0)


@dataclass(frozen=True)
class Identity:
    """What makes a person recognisable: clothing, build, hair, skin and carried things."""

    upper_idx: int
    upper: Colour
    upper2: Colour
    upper_pattern: str
    pattern_freq: float
    pattern_phase: float
    short_sleeves: bool
    lower_idx: int
    lower: Colour
    lower2: Colour
    lower_pattern: str
    shoes: Colour
    skin: Colour
    hair: Colour
    hair_style: str
    hat: Optional[Colour]
    bag: str
    bag_colour: Colour
    height: float  # fraction of the image height the person spans
    width: float  # build: shoulder / hip width scale
    leg: float  # leg length as a fraction of body height
    head: float  # head size scale


def _upper_clothes(rng: np.random.Generator, exclude: Optional[int] = None) -> Dict[str, object]:
    idx, colour = palette_colour(rng, UPPER_WEIGHTS, exclude)
    _, colour2 = palette_colour(rng, UPPER_WEIGHTS, idx)
    return dict(upper_idx=idx, upper=colour, upper2=colour2,
                upper_pattern=pick(rng, _UPPER_PATTERNS, _UPPER_PATTERN_WEIGHTS),
                pattern_freq=float(rng.uniform(3.0, 7.0)), pattern_phase=float(rng.uniform()),
                short_sleeves=bool(rng.random() < 0.35))


def _lower_clothes(rng: np.random.Generator, exclude: Optional[int] = None) -> Dict[str, object]:
    idx, colour = palette_colour(rng, LOWER_WEIGHTS, exclude)
    _, colour2 = palette_colour(rng, UPPER_WEIGHTS, idx)
    return dict(lower_idx=idx, lower=colour, lower2=colour2,
                lower_pattern=pick(rng, _LOWER_PATTERNS, _LOWER_PATTERN_WEIGHTS),
                shoes=palette_colour(rng, LOWER_WEIGHTS)[1])


def _extras(rng: np.random.Generator) -> Dict[str, object]:
    return dict(hair=_table_colour(rng, _HAIR, _HAIR_WEIGHTS),
                hair_style=pick(rng, _HAIR_STYLES, _HAIR_STYLE_WEIGHTS),
                hat=palette_colour(rng, UPPER_WEIGHTS)[1] if rng.random() < 0.15 else None,
                bag=pick(rng, _BAGS, _BAG_WEIGHTS),
                bag_colour=palette_colour(rng, UPPER_WEIGHTS)[1])


def _build(rng: np.random.Generator) -> Dict[str, object]:
    return dict(height=float(rng.uniform(0.84, 0.96)), width=float(rng.uniform(0.85, 1.2)),
                leg=float(rng.uniform(0.44, 0.51)), head=float(rng.uniform(0.9, 1.1)))


def random_identity(rng: np.random.Generator) -> Identity:
    return Identity(**_upper_clothes(rng), **_lower_clothes(rng), skin=_table_colour(rng, _SKIN),
                     **_extras(rng), **_build(rng))


def _variant_identity(rng: np.random.Generator, base: Identity) -> Identity:
    """A near-duplicate of ``base``: one group of attributes redrawn, the rest shared."""
    kind = rng.choice(4)
    if kind == 0:  # same top, other legs
        return replace(base, **_lower_clothes(rng, exclude=base.lower_idx))
    if kind == 1:  # same colours, other pattern / sleeves
        patterns = [p for p in _UPPER_PATTERNS if p != base.upper_pattern]
        _, colour2 = palette_colour(rng, UPPER_WEIGHTS, base.upper_idx)
        return replace(base, upper_pattern=patterns[int(rng.choice(len(patterns)))],
                       upper2=colour2, short_sleeves=not base.short_sleeves)
    if kind == 2:  # same clothes, other hair, hat, bag and shoes
        bags = [b for b in _BAGS if b != base.bag]
        extras = _extras(rng)
        extras["bag"] = bags[int(rng.choice(len(bags)))]
        return replace(base, **extras, shoes=palette_colour(rng, LOWER_WEIGHTS)[1])
    # same outfit on another body (a uniform)
    return replace(base, **_build(rng), skin=_table_colour(rng, _SKIN),
                   hair=_table_colour(rng, _HAIR, _HAIR_WEIGHTS))


def make_identities(seed: int, count: int, offset: int) -> List[Identity]:
    """``count`` identities; about a quarter are near-duplicates of an earlier one of the list."""
    people: List[Identity] = []
    for k in range(count):
        rng = random_stream(seed, STREAM_IDENTITY, offset + k)
        if people and rng.random() < 0.25:
            people.append(_variant_identity(rng, people[int(rng.integers(len(people)))]))
        else:
            people.append(random_identity(rng))
    return people
