"""A seeded synthetic person re-identification dataset, written in Market-1501 folder format.

The project's machines hold no real re-id data, so training and tests run on people drawn here.
An identity is an appearance (clothing colours and patterns, body build, hair, skin, hat, bag);
each image of it is taken by one of a few cameras that differ in colour cast, exposure, blur,
resolution and background, with pose, occlusion and clutter varying per image. Some identities
are near-duplicates of another (same top, other trousers; same colours, other pattern...), so
colour alone does not identify a person.

The output is a pure function of the arguments: every random draw comes from its own
``numpy.random.Generator(PCG64(...))`` stream, keyed by (seed, purpose, index), and JPEGs are
written with a fixed quality. Generation happens in a temporary sibling folder that is renamed
into place once complete, with ``generation.json`` written last, so an interrupted run never
leaves a folder that looks finished.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, replace
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageFilter

from adaptive_l2.run_lock import PidLock, pid_alive

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MARKER_FILE = "generation.json"
TRAIN_DIR = "bounding_box_train"
QUERY_DIR = "query"
GALLERY_DIR = "bounding_box_test"
JPEG_QUALITY = 90
MAX_PID = 1501  # fast-reid's Market1501 loader asserts 0 <= pid <= 1501
MAX_CAMERAS = 6  # ... and 1 <= camera <= 6
DISTRACTOR_PID = 0  # Market-1501's "background / distractor" id, kept in the gallery

_GENERATOR = "adaptive_l2.data.synthetic.generate_synthetic_market"
_SUPERSAMPLE = 2  # draw at 2x and box-filter down, so stripes and edges are not jagged
_MAX_CAMERAS_PER_ID = 4

# Purposes of the independent random streams.
(_STREAM_LAYOUT, _STREAM_IDENTITY, _STREAM_CAMERA, _STREAM_IMAGE, _STREAM_DISTRACTOR,
 _STREAM_SCENE) = range(6)

Colour = Tuple[float, float, float]
Point = Tuple[float, float]
Segment = Tuple[Point, Point]

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
_UPPER_WEIGHTS = np.array(
    [3.0, 2.0, 1.5, 2.5, 1.5, 1.3, 1.0, 1.0, 0.7, 0.7, 0.6, 0.6, 0.8, 0.6, 1.0, 0.8, 0.6, 0.5, 0.5])
_LOWER_WEIGHTS = np.array(
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
_VIEWS = ("front", "back", "side")
_VIEW_WEIGHTS = np.array([0.4, 0.4, 0.2])


def _rng(seed: int, stream: int, index: int = 0) -> np.random.Generator:
    """An independent generator per (seed, purpose, index): draws never depend on call order."""
    sequence = np.random.SeedSequence(seed, spawn_key=(stream, index))
    return np.random.Generator(np.random.PCG64(sequence))


def _pick(rng: np.random.Generator, options: Sequence[str], weights: np.ndarray) -> str:
    return options[int(rng.choice(len(options), p=weights / weights.sum()))]


def _palette_colour(rng: np.random.Generator, weights: np.ndarray,
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
class _Identity:
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
    idx, colour = _palette_colour(rng, _UPPER_WEIGHTS, exclude)
    _, colour2 = _palette_colour(rng, _UPPER_WEIGHTS, idx)
    return dict(upper_idx=idx, upper=colour, upper2=colour2,
                upper_pattern=_pick(rng, _UPPER_PATTERNS, _UPPER_PATTERN_WEIGHTS),
                pattern_freq=float(rng.uniform(3.0, 7.0)), pattern_phase=float(rng.uniform()),
                short_sleeves=bool(rng.random() < 0.35))


def _lower_clothes(rng: np.random.Generator, exclude: Optional[int] = None) -> Dict[str, object]:
    idx, colour = _palette_colour(rng, _LOWER_WEIGHTS, exclude)
    _, colour2 = _palette_colour(rng, _UPPER_WEIGHTS, idx)
    return dict(lower_idx=idx, lower=colour, lower2=colour2,
                lower_pattern=_pick(rng, _LOWER_PATTERNS, _LOWER_PATTERN_WEIGHTS),
                shoes=_palette_colour(rng, _LOWER_WEIGHTS)[1])


def _extras(rng: np.random.Generator) -> Dict[str, object]:
    return dict(hair=_table_colour(rng, _HAIR, _HAIR_WEIGHTS),
                hair_style=_pick(rng, _HAIR_STYLES, _HAIR_STYLE_WEIGHTS),
                hat=_palette_colour(rng, _UPPER_WEIGHTS)[1] if rng.random() < 0.15 else None,
                bag=_pick(rng, _BAGS, _BAG_WEIGHTS),
                bag_colour=_palette_colour(rng, _UPPER_WEIGHTS)[1])


def _build(rng: np.random.Generator) -> Dict[str, object]:
    return dict(height=float(rng.uniform(0.84, 0.96)), width=float(rng.uniform(0.85, 1.2)),
                leg=float(rng.uniform(0.44, 0.51)), head=float(rng.uniform(0.9, 1.1)))


def _random_identity(rng: np.random.Generator) -> _Identity:
    return _Identity(**_upper_clothes(rng), **_lower_clothes(rng), skin=_table_colour(rng, _SKIN),
                     **_extras(rng), **_build(rng))


def _variant_identity(rng: np.random.Generator, base: _Identity) -> _Identity:
    """A near-duplicate of ``base``: one group of attributes redrawn, the rest shared."""
    kind = rng.choice(4)
    if kind == 0:  # same top, other legs
        return replace(base, **_lower_clothes(rng, exclude=base.lower_idx))
    if kind == 1:  # same colours, other pattern / sleeves
        patterns = [p for p in _UPPER_PATTERNS if p != base.upper_pattern]
        _, colour2 = _palette_colour(rng, _UPPER_WEIGHTS, base.upper_idx)
        return replace(base, upper_pattern=patterns[int(rng.choice(len(patterns)))],
                       upper2=colour2, short_sleeves=not base.short_sleeves)
    if kind == 2:  # same clothes, other hair, hat, bag and shoes
        bags = [b for b in _BAGS if b != base.bag]
        extras = _extras(rng)
        extras["bag"] = bags[int(rng.choice(len(bags)))]
        return replace(base, **extras, shoes=_palette_colour(rng, _LOWER_WEIGHTS)[1])
    # same outfit on another body (a uniform)
    return replace(base, **_build(rng), skin=_table_colour(rng, _SKIN),
                   hair=_table_colour(rng, _HAIR, _HAIR_WEIGHTS))


def _identities(seed: int, count: int, offset: int) -> List[_Identity]:
    """``count`` identities; about a quarter are near-duplicates of an earlier one of the list."""
    people: List[_Identity] = []
    for k in range(count):
        rng = _rng(seed, _STREAM_IDENTITY, offset + k)
        if people and rng.random() < 0.25:
            people.append(_variant_identity(rng, people[int(rng.integers(len(people)))]))
        else:
            people.append(_random_identity(rng))
    return people


@dataclass
class _Camera:
    """A camera's look: colour cast, exposure, optics and its scene (background)."""

    gains: np.ndarray
    brightness: float
    contrast: float
    gamma: float
    blur: float  # Gaussian sigma in output pixels
    noise: float  # sensor noise sigma on the 0..255 scale
    resolution: float  # < 1: the camera sees the person at lower resolution
    scale: float  # person size bias (distance to the camera)
    light: float  # side lighting strength / direction
    background: np.ndarray  # (h, w, 3) scene, larger than an image, cropped per image


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: Tuple[int, int]) -> np.ndarray:
    """Low-frequency noise in 0..1: a coarse random grid upsampled bilinearly."""
    coarse = rng.random(cells).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR),
                      dtype=np.float64)


def _muted(rng: np.random.Generator, weights: np.ndarray) -> np.ndarray:
    """A palette colour washed towards grey, as walls and pavements mostly are."""
    _, colour = _palette_colour(rng, weights)
    mix = rng.uniform(0.1, 0.5)
    return mix * np.array(colour) + (1.0 - mix) * rng.uniform(0.3, 0.7)


def _wall(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """One stretch of wall: bricks, panels, windows, foliage or plain."""
    yy, xx = np.mgrid[0:h, 0:w]
    s = _SUPERSAMPLE
    wall = np.broadcast_to(_muted(rng, _UPPER_WEIGHTS), (h, w, 3)).copy()
    kind = rng.choice(5)
    if kind == 0:  # bricks
        bh, bw = int(rng.integers(5, 9)) * s, int(rng.integers(12, 22)) * s
        row = yy // bh
        shifted = xx + (row % 2) * (bw // 2)
        jitter = rng.uniform(0.88, 1.12, (row.max() + 1, shifted.max() // bw + 1))
        mortar = (yy % bh < s) | (shifted % bw < s)
        wall *= (jitter[row, shifted // bw] * np.where(mortar, 0.75, 1.0))[..., None]
    elif kind == 1:  # vertical panels
        pw = int(rng.integers(10, 30)) * s
        wall *= rng.uniform(0.85, 1.15, w // pw + 1)[xx // pw][..., None]
    elif kind == 2:  # windows
        cw, ch = int(rng.integers(16, 30)) * s, int(rng.integers(20, 36)) * s
        inside = ((xx % cw) > cw * 0.2) & ((xx % cw) < cw * 0.8) & ((yy % ch) > ch * 0.15) & (
            (yy % ch) < ch * 0.75)
        wall[inside] = _muted(rng, _UPPER_WEIGHTS) * rng.uniform(0.5, 1.2)
    elif kind == 3:  # foliage
        leaf = _smooth_noise(rng, h, w, (10, max(2, w // 20)))[..., None] * 0.8
        green = np.array([0.22, 0.38, 0.2]) * rng.uniform(0.7, 1.3)
        wall = wall * (1.0 - leaf) + green * leaf
    return wall


def _place(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """One place along the walkway: a stretch of wall above a floor (pavement or tiles)."""
    yy, xx = np.mgrid[0:h, 0:w]
    horizon = int(h * rng.uniform(0.45, 0.75))
    floor = np.broadcast_to(_muted(rng, _LOWER_WEIGHTS), (h, w, 3)).copy()
    if rng.random() < 0.5:  # tiles
        tile = int(rng.integers(8, 20)) * _SUPERSAMPLE
        lines = (xx % tile < _SUPERSAMPLE) | ((yy - horizon) % tile < _SUPERSAMPLE)
        floor *= np.where(lines, 0.85, 1.0)[..., None]
    return np.where((yy < horizon)[..., None], _wall(rng, h, w), floor)


def _campus(seed: int, h: int, w: int) -> np.ndarray:
    """The scene all cameras look into: a wide strip of places.

    Cameras see overlapping parts of it, so a background hints at the camera (as in real data)
    without identifying it, and images of one camera do not share one background.
    """
    rng = _rng(seed, _STREAM_SCENE)
    cuts = np.sort(rng.choice(np.arange(1, w), size=int(rng.integers(8, 13)), replace=False))
    bounds = [0, *cuts.tolist(), w]
    return np.concatenate([_place(rng, h, b - a) for a, b in zip(bounds[:-1], bounds[1:])], axis=1)


def _camera(seed: int, index: int, campus: np.ndarray, view_w: int, difficulty: float) -> _Camera:
    """Camera ``index``: its look, and the part of the campus it films (``view_w`` wide)."""
    rng = _rng(seed, _STREAM_CAMERA, index)
    d = difficulty
    h, w = campus.shape[:2]
    x0 = int(rng.integers(0, w - view_w + 1))
    light = 0.75 + 0.5 * _smooth_noise(rng, h, view_w, (4, max(2, view_w // 60)))
    return _Camera(
        gains=np.clip(1.0 + rng.normal(0.0, 0.04 * d, 3), 0.8, 1.2),
        brightness=float(rng.uniform(1.0 - 0.12 * d, 1.0 + 0.08 * d)),
        contrast=float(rng.uniform(1.0 - 0.1 * d, 1.0 + 0.05 * d)),
        gamma=float(np.exp(rng.uniform(-0.1 * d, 0.1 * d))),
        blur=float(rng.uniform(0.0, 1.0 * d)),
        noise=float(rng.uniform(1.0, 6.0) * d),
        resolution=float(1.0 - rng.uniform(0.0, 0.5 * min(d, 1.5))),
        scale=float(rng.uniform(1.0 - 0.1 * d, 1.0 + 0.03 * d)),
        light=float(rng.uniform(-0.3, 0.3)),
        background=np.clip(campus[:, x0:x0 + view_w] * light[..., None], 0, 1).astype(np.float32),
    )


@dataclass(frozen=True)
class _Pose:
    """Where and how a person stands in one image (pixel units of the supersampled canvas)."""

    top: float
    cx: float
    height_px: float
    flip: bool
    lean: float
    view: str
    stride: float  # 0 feet together .. 1 wide step
    swing: float  # arm swing, -1 .. 1


class _Window(NamedTuple):
    """A view of the canvas with the body coordinates (u across, v down) of its pixels."""

    canvas: np.ndarray
    u: np.ndarray
    v: np.ndarray
    lit: np.ndarray  # side lighting factor


class _BodyFrame:
    """Body coordinates of one posed person (v: 0 top of head .. 1 soles, u: across, in body
    heights). Each body part asks for the window it can cover, so drawing touches few pixels."""

    def __init__(self, canvas: np.ndarray, pose: _Pose, light: float) -> None:
        self.canvas, self.pose, self.light = canvas, pose, light

    def window(self, u0: float, u1: float, v0: float, v1: float) -> Optional[_Window]:
        p = self.pose
        h, w = self.canvas.shape[:2]
        r0 = max(0, int(np.floor(p.top + v0 * p.height_px)))
        r1 = min(h, int(np.ceil(p.top + v1 * p.height_px)) + 1)
        sign = -1.0 if p.flip else 1.0
        corners = [sign * u + p.lean * (v - 1.0) for u in (u0, u1) for v in (v0, v1)]
        c0 = max(0, int(np.floor(p.cx + p.height_px * min(corners))))
        c1 = min(w, int(np.ceil(p.cx + p.height_px * max(corners))) + 1)
        if r0 >= r1 or c0 >= c1:
            return None
        v = ((np.arange(r0, r1, dtype=np.float32) - p.top) / p.height_px)[:, None]
        u = (np.arange(c0, c1, dtype=np.float32) - p.cx)[None, :] / p.height_px - p.lean * (v - 1.0)
        if p.flip:
            u = -u
        v = np.broadcast_to(v, u.shape)
        lit = 1.0 + self.light * np.clip(u, -0.3, 0.3)
        return _Window(self.canvas[r0:r1, c0:c1], u, v, lit)


def _fill(canvas: np.ndarray, mask: np.ndarray, colour: Colour,
          shade: Optional[np.ndarray] = None) -> None:
    if shade is None:
        canvas[mask] = colour
    else:
        canvas[mask] = shade[mask][:, None] * np.asarray(colour, dtype=np.float32)


def _fill_two(canvas: np.ndarray, mask: np.ndarray, colour: Colour, colour2: Colour,
              second: np.ndarray, shade: np.ndarray) -> None:
    """Fill ``mask`` with ``colour2`` where ``second`` is true, else ``colour`` (a pattern)."""
    second = np.broadcast_to(second, mask.shape)
    picked = np.where(second[mask][:, None], np.asarray(colour2, dtype=np.float32),
                      np.asarray(colour, dtype=np.float32))
    canvas[mask] = shade[mask][:, None] * picked


def _segment(u: np.ndarray, v: np.ndarray, p0: Point, p1: Point) -> Tuple[np.ndarray, np.ndarray]:
    """Distance of each point to the segment p0-p1, and the position t (0..1) along it."""
    du, dv = p1[0] - p0[0], p1[1] - p0[1]
    t = np.clip(((u - p0[0]) * du + (v - p0[1]) * dv) / (du * du + dv * dv), 0.0, 1.0)
    return np.hypot(u - (p0[0] + t * du), v - (p0[1] + t * dv)), t


def _around(p0: Point, p1: Point, margin: float) -> Tuple[float, float, float, float]:
    """Bounding box (u0, u1, v0, v1) of a segment, grown by ``margin``."""
    return (min(p0[0], p1[0]) - margin, max(p0[0], p1[0]) + margin,
            min(p0[1], p1[1]) - margin, max(p0[1], p1[1]) + margin)


@dataclass(frozen=True)
class _Figure:
    """Body measures of one person in one pose, in body units (v: 0 top of head .. 1 soles)."""

    person: _Identity
    view: str
    side: bool
    head_rx: float
    head_ry: float
    head_cy: float
    shoulder_v: float
    crotch_v: float
    waist_v: float
    sh_half: float
    waist_half: float
    hip_half: float
    arms: Tuple[Segment, Segment]  # in a side view the first one is the far arm
    legs: Tuple[Segment, Segment]
    arm_r: float
    leg_r: float

    @property
    def hand_v(self) -> float:
        return self.arms[0][1][1]


def _figure(person: _Identity, pose: _Pose) -> _Figure:
    side = pose.view == "side"
    wf = person.width * (0.62 if side else 1.0)  # seen from the side a person is narrower
    head_ry = 0.062 * person.head
    head_cy = head_ry + 0.004
    shoulder_v = head_cy + head_ry + 0.028
    crotch_v = 1.0 - person.leg
    waist_v = crotch_v - 0.075
    sh_half = 0.14 * wf
    arm_v, hand_v, hip_v = shoulder_v + 0.03, waist_v + 0.06, crotch_v - 0.02
    if side:  # arms and legs swing forward and back
        swing, step = 0.09 * pose.swing, 0.1 * pose.stride
        arms = (((0.0, arm_v), (-swing, hand_v)), ((0.0, arm_v), (swing, hand_v)))
        legs = (((-0.012, hip_v), (-step, 0.965)), ((0.012, hip_v), (step, 0.965)))
    else:  # arms hang beside the body, feet apart
        out = sh_half + 0.025 + 0.02 * abs(pose.swing)
        spread = 0.05 * wf + 0.03 * pose.stride
        arms = (((-sh_half * 0.9, arm_v), (-out, hand_v)), ((sh_half * 0.9, arm_v), (out, hand_v)))
        legs = (((-0.056 * wf, hip_v), (-spread, 0.965)), ((0.056 * wf, hip_v), (spread, 0.965)))
    return _Figure(
        person=person, view=pose.view, side=side,
        head_rx=0.048 * person.head * (0.92 if side else 1.0), head_ry=head_ry, head_cy=head_cy,
        shoulder_v=shoulder_v, crotch_v=crotch_v, waist_v=waist_v,
        sh_half=sh_half, waist_half=0.118 * wf, hip_half=0.12 * wf, arms=arms, legs=legs,
        arm_r=0.034 * person.width, leg_r=0.054 * person.width * (0.85 if side else 1.0))


def _checks(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (np.floor(u * 45.0) + np.floor(v * 45.0)) % 2 == 0


def _paint_long_hair(body: _BodyFrame, fig: _Figure) -> None:
    half = fig.head_rx * 1.15
    win = body.window(-half, half, fig.head_cy, fig.shoulder_v + 0.07)
    if win is not None:
        _fill(win.canvas, (np.abs(win.u) < half) & (win.v > fig.head_cy), fig.person.hair, win.lit)


def _paint_arm(body: _BodyFrame, fig: _Figure, arm: Segment) -> None:
    p0, p1 = arm
    person = fig.person
    win = body.window(*_around(p0, p1, fig.arm_r + 0.04))
    if win is None:
        return
    dist, t = _segment(win.u, win.v, p0, p1)
    inside = dist < fig.arm_r * (1.0 - 0.25 * t)
    shade = win.lit * (1.0 - 0.3 * (dist / fig.arm_r) ** 2)
    sleeve_end = 0.4 if person.short_sleeves else 0.93
    _fill(win.canvas, inside & (t < sleeve_end), person.upper, shade)
    _fill(win.canvas, inside & (t >= sleeve_end), person.skin, shade)
    hand = (win.u - p1[0]) ** 2 + (win.v - p1[1] - 0.01) ** 2 < 0.024 ** 2
    _fill(win.canvas, hand, person.skin, win.lit)


def _paint_leg(body: _BodyFrame, fig: _Figure, leg: Segment) -> None:
    """A leg in trousers (plain, side stripe, checks), bare below shorts / a skirt, and a shoe."""
    p0, p1 = leg
    person = fig.person
    win = body.window(*_around(p0, p1, fig.leg_r + 0.06))
    if win is None:
        return
    u, v = win.u, win.v
    dist, t = _segment(u, v, p0, p1)
    radius = fig.leg_r * (1.0 - 0.33 * t)
    inside = dist < radius
    shade = win.lit * (1.0 - 0.3 * (dist / fig.leg_r) ** 2)
    if person.lower_pattern in ("shorts", "skirt"):
        covered = inside & (t < (0.42 if person.lower_pattern == "shorts" else 0.0))
        _fill(win.canvas, inside & ~covered, person.skin, shade)
        _fill(win.canvas, covered, person.lower, shade)
    elif person.lower_pattern == "side_stripe":
        axis_u = p0[0] + t * (p1[0] - p0[0])
        outer = (u - axis_u) * (np.sign(p0[0]) or 1.0) > 0.55 * radius
        _fill_two(win.canvas, inside, person.lower, person.lower2, outer, shade)
    elif person.lower_pattern == "checks":
        _fill_two(win.canvas, inside, person.lower, person.lower2, _checks(u, v), shade)
    else:
        _fill(win.canvas, inside, person.lower, shade)
    toe = 0.014 if fig.side else 0.0
    shoe = ((u - p1[0] - toe) / 0.04) ** 2 + ((v - 0.972) / 0.022) ** 2 < 1.0
    _fill(win.canvas, shoe, person.shoes, win.lit)


def _paint_hips(body: _BodyFrame, fig: _Figure) -> None:
    """The top of the trousers, or a skirt flaring out to the knees."""
    person = fig.person
    flare = fig.hip_half * 1.6
    win = body.window(-flare, flare, fig.waist_v, fig.crotch_v + 0.17)
    if win is None:
        return
    u, v = win.u, win.v
    if person.lower_pattern == "skirt":
        sv = (v - fig.waist_v) / (fig.crotch_v + 0.17 - fig.waist_v)
        skirt = (sv >= 0) & (sv <= 1) & (np.abs(u) <= fig.hip_half * (1.0 + 0.6 * sv))
        shade = win.lit * (1.0 - 0.25 * np.clip(u / flare, -1, 1) ** 2)
        _fill(win.canvas, skirt, person.lower, shade)
        return
    hips = (v >= fig.waist_v) & (v <= fig.crotch_v + 0.01) & (np.abs(u) <= fig.hip_half)
    if person.lower_pattern == "checks":
        _fill_two(win.canvas, hips, person.lower, person.lower2, _checks(u, v), win.lit)
    else:
        _fill(win.canvas, hips, person.lower, win.lit)


def _paint_torso(body: _BodyFrame, fig: _Figure) -> None:
    """The upper body with its pattern, then a backpack (seen from the back) or its straps."""
    person = fig.person
    win = body.window(-fig.sh_half, fig.sh_half, fig.shoulder_v, fig.waist_v)
    if win is None:
        return
    u, v = win.u, win.v
    # Torso coordinates: tu -1..1 across, tv 0..1 from shoulders to waist.
    tv = (v - fig.shoulder_v) / (fig.waist_v - fig.shoulder_v)
    half = fig.sh_half + (fig.waist_half - fig.sh_half) * np.clip(tv, 0.0, 1.0)
    half = half * (0.78 + 0.22 * np.clip(tv / 0.12, 0.0, 1.0))  # rounded shoulders
    torso = (tv >= 0.0) & (tv <= 1.0) & (np.abs(u) <= half)
    tu = u / half
    shade = win.lit * (1.0 - 0.3 * np.clip(tu, -1.0, 1.0) ** 2)
    hstripes = ((tv * person.pattern_freq + person.pattern_phase) % 1.0) < 0.5
    vstripes = ((tu * person.pattern_freq * 0.5 + person.pattern_phase) % 1.0) < 0.5
    second: Optional[np.ndarray] = {
        "hstripes": hstripes,
        "vstripes": vstripes,
        "checks": hstripes ^ vstripes,
        "logo": ((np.abs(tu) < 0.4) & (tv > 0.18) & (tv < 0.45)) if fig.view == "front" else None,
        "two_tone": tu < 0.0,
        "band": (tv > 0.35) & (tv < 0.55),
    }.get(person.upper_pattern)
    if second is None:
        _fill(win.canvas, torso, person.upper, shade)
    else:
        _fill_two(win.canvas, torso, person.upper, person.upper2, second, shade)
    if person.bag == "backpack" and fig.view == "back":
        pack = (np.abs(u) < fig.sh_half * 0.78) & (v > fig.shoulder_v + 0.02) & (
            v < fig.waist_v - 0.005)
        _fill(win.canvas, pack, person.bag_colour, win.lit)
    elif person.bag == "backpack" and fig.view == "front":
        straps = (np.abs(np.abs(u) - fig.sh_half * 0.5) < 0.013) & (
            v < fig.shoulder_v + 0.6 * (fig.waist_v - fig.shoulder_v))
        _fill(win.canvas, straps, person.bag_colour, win.lit)


def _paint_side_backpack(body: _BodyFrame, fig: _Figure) -> None:
    win = body.window(-fig.sh_half - 0.075, -fig.sh_half + 0.02, fig.shoulder_v + 0.02, fig.waist_v)
    if win is not None:
        _fill(win.canvas, np.ones(win.u.shape, dtype=bool), fig.person.bag_colour, win.lit)


def _paint_hand_luggage(body: _BodyFrame, fig: _Figure) -> None:
    """A shoulder bag (strap across the chest, bag at the hip) or a handbag held in one hand."""
    person = fig.person
    if person.bag == "shoulder":
        win = body.window(-fig.sh_half, fig.sh_half + 0.1, fig.shoulder_v, fig.waist_v + 0.06)
        if win is None:
            return
        strap, _ = _segment(win.u, win.v, (-fig.sh_half * 0.7, fig.shoulder_v + 0.005),
                            (fig.sh_half * 1.05, fig.waist_v))
        _fill(win.canvas, (strap < 0.009) & (win.v < fig.waist_v), person.bag_colour, win.lit)
        left = -0.045 if fig.side else fig.sh_half + 0.005
        box = (win.u > left) & (win.u < left + 0.085) & (win.v > fig.waist_v - 0.04)
        _fill(win.canvas, box, person.bag_colour, win.lit)
    elif person.bag == "handbag":
        hand_u = fig.arms[1][1][0]
        win = body.window(hand_u - 0.035, hand_u + 0.035, fig.hand_v + 0.01, fig.hand_v + 0.08)
        if win is not None:
            _fill(win.canvas, np.ones(win.u.shape, dtype=bool), person.bag_colour, win.lit)


def _paint_head(body: _BodyFrame, fig: _Figure) -> None:
    """Neck, face, hair (covering the head seen from the back), long hair down the back, hat."""
    person = fig.person
    win = body.window(-fig.head_rx * 1.7, fig.head_rx * 1.7, -0.01, fig.shoulder_v + 0.01)
    if win is None:
        return
    u, v = win.u, win.v
    neck = (np.abs(u) < 0.026 * person.width) & (v > fig.head_cy)
    _fill(win.canvas, neck, person.skin, win.lit)
    hx, hy = u / fig.head_rx, (v - fig.head_cy) / fig.head_ry
    head = hx ** 2 + hy ** 2 <= 1.0
    _fill(win.canvas, head, person.skin, win.lit * (1.0 - 0.25 * np.clip(hx, -1, 1) ** 2))
    if person.hair_style != "bald":
        if fig.view == "back":
            hair = head & (hy < 0.7)
        elif fig.side:
            hair = head & ((hy < -0.3) | (hx < -0.2))
        else:
            hair = head & ((hy < -0.35) | ((np.abs(hx) > 0.8) & (hy < 0.2)))
        _fill(win.canvas, hair, person.hair, win.lit)
    if person.hair_style == "long" and fig.view == "back":
        _paint_long_hair(body, fig)
    if person.hat is not None:
        crown = ((hx / 1.08) ** 2 + (hy / 1.08) ** 2 <= 1.0) & (hy < -0.3)
        if fig.side:
            brim_u = (u > -fig.head_rx) & (u < fig.head_rx * 1.7)
        else:
            brim_u = np.abs(u) < fig.head_rx * 1.25
        brim = brim_u & (np.abs(v - (fig.head_cy - 0.3 * fig.head_ry)) < 0.008)
        _fill(win.canvas, crown | brim, person.hat, win.lit)


def _paint_person(canvas: np.ndarray, person: _Identity, pose: _Pose, light: float) -> None:
    """Draw a coarse person figure over ``canvas``, back to front."""
    body = _BodyFrame(canvas, pose, light)
    fig = _figure(person, pose)
    if person.hair_style == "long" and pose.view != "back":
        _paint_long_hair(body, fig)
    if person.bag == "backpack" and fig.side:
        _paint_side_backpack(body, fig)
    if fig.side:
        _paint_arm(body, fig, fig.arms[0])
    for leg in fig.legs:
        _paint_leg(body, fig, leg)
    _paint_hips(body, fig)
    _paint_torso(body, fig)
    for arm in fig.arms[1:] if fig.side else fig.arms:
        _paint_arm(body, fig, arm)
    _paint_hand_luggage(body, fig)
    _paint_head(body, fig)


def _random_pose(rng: np.random.Generator, canvas_h: int, canvas_w: int, person: _Identity,
                 camera: _Camera, difficulty: float) -> _Pose:
    d = difficulty
    zoom = rng.uniform(1.0 - 0.08 * d, 1.0 + 0.05 * d)
    height_px = min(canvas_h * person.height * camera.scale * zoom, canvas_h * 1.02)
    return _Pose(
        top=(canvas_h - height_px) / 2 + rng.normal(0.0, 0.03 * d) * canvas_h,
        cx=canvas_w / 2 + rng.normal(0.0, 0.07 * d) * canvas_w,
        height_px=height_px,
        flip=bool(rng.random() < 0.5),
        lean=float(rng.normal(0.0, 0.04 * d)),
        view=_pick(rng, _VIEWS, _VIEW_WEIGHTS),
        stride=float(rng.uniform()),
        swing=float(rng.uniform(-1.0, 1.0)),
    )


def _span(centre: float, half: float, size: int) -> slice:
    return slice(max(0, int(np.floor(centre - half))), min(size, int(np.ceil(centre + half)) + 1))


def _background(rng: np.random.Generator, camera: _Camera, h: int, w: int, difficulty: float,
                shapes: float) -> np.ndarray:
    """A random crop of the camera's scene, with random shapes (clutter) drawn on it."""
    bh, bw, _ = camera.background.shape
    y0, x0 = int(rng.integers(0, bh - h + 1)), int(rng.integers(0, bw - w + 1))
    canvas = camera.background[y0:y0 + h, x0:x0 + w].copy()
    for _ in range(int(rng.poisson(shapes * difficulty))):
        colour = _palette_colour(rng, _UPPER_WEIGHTS)[1]
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        rx, ry = rng.uniform(0.04, 0.2) * w, rng.uniform(0.03, 0.12) * h
        rows, cols = _span(cy, ry, h), _span(cx, rx, w)
        patch = canvas[rows, cols]
        if rng.random() < 0.5:
            patch[...] = colour
        else:
            y = (np.arange(rows.start, rows.stop, dtype=np.float32)[:, None] - cy) / ry
            x = (np.arange(cols.start, cols.stop, dtype=np.float32)[None, :] - cx) / rx
            patch[x ** 2 + y ** 2 < 1.0] = colour
    return canvas


def _occlude(rng: np.random.Generator, canvas: np.ndarray, camera: _Camera,
             difficulty: float) -> None:
    """Maybe cover part of the image: an object from the bottom / side, a pole or another person."""
    h, w = canvas.shape[:2]
    if rng.random() >= min(0.45 * difficulty, 0.9):
        return
    kind = rng.choice(3, p=[0.4, 0.3, 0.3])
    if kind == 0:
        colour = np.asarray(_palette_colour(rng, _UPPER_WEIGHTS)[1], dtype=np.float32)
        if rng.random() < 0.6:  # bench, car, bin from the bottom
            rows = slice(int(h * (1.0 - rng.uniform(0.15, 0.4))), h)
            cols = _span(rng.uniform(0, w), rng.uniform(0.25, 0.6) * w, w)
        else:  # something entering from a side
            edge = int(rng.uniform(0.2, 0.4) * w)
            cols = slice(0, edge) if rng.random() < 0.5 else slice(w - edge, w)
            rows = _span(rng.uniform(0.3, 0.8) * h, rng.uniform(0.15, 0.35) * h, h)
        fade = 0.8 + 0.4 * np.arange(rows.start, rows.stop, dtype=np.float32) / h
        canvas[rows, cols] = fade[:, None, None] * colour
    elif kind == 1:  # pole
        cx, half = rng.uniform(0.1, 0.9) * w, rng.uniform(0.025, 0.06) * w
        cols = _span(cx, half, w)
        x = (np.arange(cols.start, cols.stop, dtype=np.float32) - cx) / half
        grey = rng.uniform(0.25, 0.75) * np.array([1.0, 1.0, 1.02], dtype=np.float32)
        canvas[:, cols] = np.clip(1.0 - 0.4 * x ** 2, 0.0, 1.0)[None, :, None] * grey
    else:  # a passer-by, partly in the frame
        other = _random_identity(rng)
        pose = _random_pose(rng, h, w, other, camera, difficulty)
        offset = rng.uniform(0.4, 0.65) * w * (1 if rng.random() < 0.5 else -1)
        _paint_person(canvas, other, replace(pose, cx=pose.cx + offset), camera.light)


def _finish(rng: np.random.Generator, canvas: np.ndarray, camera: _Camera, out_h: int, out_w: int,
            difficulty: float) -> Image.Image:
    """Downsample, then apply the camera: colour cast, exposure, resolution, blur, noise."""
    big = Image.fromarray(np.round(np.clip(canvas, 0.0, 1.0) * 255.0).astype(np.uint8))
    img = np.asarray(big.resize((out_w, out_h), Image.BOX), dtype=np.float32) / 255.0
    exposure = rng.uniform(1.0 - 0.1 * difficulty, 1.0 + 0.1 * difficulty)
    gain = camera.gains * camera.brightness * exposure
    img = img * gain.astype(np.float32)
    mean = img.mean()
    img = np.clip((img - mean) * camera.contrast + mean, 0.0, 1.0) ** camera.gamma
    pil = Image.fromarray(np.round(img * 255.0).astype(np.uint8))
    if camera.resolution < 0.95:
        low = (max(8, round(out_w * camera.resolution)), max(16, round(out_h * camera.resolution)))
        pil = pil.resize(low, Image.BILINEAR).resize((out_w, out_h), Image.BILINEAR)
    sigma = camera.blur * rng.uniform(0.7, 1.3)
    if sigma > 0.1:
        pil = pil.filter(ImageFilter.GaussianBlur(radius=sigma))
    noise = rng.normal(0.0, camera.noise, (out_h, out_w, 3)).astype(np.float32)
    noisy = np.asarray(pil, dtype=np.float32) + noise
    return Image.fromarray(np.clip(np.round(noisy), 0, 255).astype(np.uint8))


def _render_person_image(rng: np.random.Generator, person: _Identity, camera: _Camera,
                         out_h: int, out_w: int, difficulty: float) -> Image.Image:
    h, w = out_h * _SUPERSAMPLE, out_w * _SUPERSAMPLE
    canvas = _background(rng, camera, h, w, difficulty, shapes=2.0)
    _paint_person(canvas, person, _random_pose(rng, h, w, person, camera, difficulty), camera.light)
    _occlude(rng, canvas, camera, difficulty)
    return _finish(rng, canvas, camera, out_h, out_w, difficulty)


def _render_distractor(rng: np.random.Generator, camera: _Camera, out_h: int, out_w: int,
                       difficulty: float) -> Image.Image:
    """A Market-style junk detection: background only, a badly cropped person, or a stranger."""
    h, w = out_h * _SUPERSAMPLE, out_w * _SUPERSAMPLE
    kind = rng.choice(3, p=[0.3, 0.35, 0.35])
    canvas = _background(rng, camera, h, w, max(difficulty, 0.5), shapes=5.0)
    if kind > 0:
        stranger = _random_identity(rng)
        pose = _random_pose(rng, h, w, stranger, camera, difficulty)
        if kind == 1:  # zoomed in on a part of a body
            zoom = rng.uniform(1.4, 2.4)
            pose = replace(pose, height_px=pose.height_px * zoom,
                           top=pose.top - rng.uniform(0.0, 0.6) * pose.height_px * zoom,
                           cx=pose.cx + rng.normal(0.0, 0.2) * w)
        _paint_person(canvas, stranger, pose, camera.light)
    _occlude(rng, canvas, camera, difficulty)
    return _finish(rng, canvas, camera, out_h, out_w, difficulty)


@dataclass(frozen=True)
class _Shot:
    """One image to write: who (identity index or None for a distractor), where, and its name."""

    folder: str
    pid: int
    camera: int  # 1-based
    frame: int
    identity: Optional[int]
    stream: int
    index: int

    @property
    def filename(self) -> str:
        return f"{self.pid:04d}_c{self.camera}s1_{self.frame:06d}_00.jpg"


def _layout(params: Dict[str, object]) -> List[_Shot]:
    """Which pid appears in which camera and split, and the file name of every image."""
    seed = int(params["seed"])
    n_train, n_test = int(params["num_train_ids"]), int(params["num_test_ids"])
    n_cams, per_id = int(params["num_cameras"]), int(params["images_per_id"])
    rng = _rng(seed, _STREAM_LAYOUT)
    pids = rng.choice(np.arange(1, MAX_PID + 1), size=n_train + n_test, replace=False)
    train_pids, test_pids = sorted(pids[:n_train].tolist()), sorted(pids[n_train:].tolist())
    frames = rng.integers(0, 1000, n_cams + 1)

    def next_frame(cam: int) -> int:
        frames[cam] += int(rng.integers(1, 120))
        return int(frames[cam])

    shots: List[_Shot] = []
    max_cams = min(n_cams, per_id - 1, _MAX_CAMERAS_PER_ID)
    for k, pid in enumerate(train_pids + test_pids):
        is_test = k >= n_train
        k_cams = int(rng.integers(2, max_cams + 1))
        cams = sorted((rng.choice(n_cams, size=k_cams, replace=False) + 1).tolist())
        counts = 1 + rng.multinomial(per_id - k_cams, np.full(k_cams, 1.0 / k_cams))
        for cam, count in zip(cams, counts):
            # One query per camera that keeps at least one gallery image of its own, so every
            # query has a gallery match in another camera.
            query_at = int(rng.integers(count)) if is_test and count >= 2 else -1
            for j in range(count):
                folder = TRAIN_DIR if not is_test else (QUERY_DIR if j == query_at else GALLERY_DIR)
                shots.append(_Shot(folder, pid, cam, next_frame(cam), k, _STREAM_IMAGE, len(shots)))
    for j in range(int(params["num_distractors"])):
        cam = int(rng.integers(1, n_cams + 1))
        shots.append(_Shot(GALLERY_DIR, DISTRACTOR_PID, cam, next_frame(cam), None,
                           _STREAM_DISTRACTOR, j))
    return shots


def _write_images(folder: str, params: Dict[str, object]) -> Dict[str, int]:
    """Render and save every image of the dataset into ``folder``; returns images per split."""
    seed, difficulty = int(params["seed"]), float(params["difficulty"])
    out_h, out_w = int(params["height"]), int(params["width"])
    n_train = int(params["num_train_ids"])
    people = _identities(seed, n_train, 0) + _identities(seed, int(params["num_test_ids"]), n_train)
    h, w = out_h * _SUPERSAMPLE, out_w * _SUPERSAMPLE
    campus = _campus(seed, int(h * 1.25), w * 12)
    cameras = [_camera(seed, c, campus, w * 5, difficulty)
               for c in range(int(params["num_cameras"]))]
    counts = {TRAIN_DIR: 0, QUERY_DIR: 0, GALLERY_DIR: 0}
    for split in counts:
        os.makedirs(os.path.join(folder, split))
    for shot in _layout(params):
        rng = _rng(seed, shot.stream, shot.index)
        camera = cameras[shot.camera - 1]
        if shot.identity is None:
            image = _render_distractor(rng, camera, out_h, out_w, difficulty)
        else:
            image = _render_person_image(rng, people[shot.identity], camera, out_h, out_w,
                                         difficulty)
        path = os.path.join(folder, shot.folder, shot.filename)
        if os.path.exists(path):
            raise RuntimeError(f"synthetic layout produced a duplicate file name: {path}")
        image.save(path, format="JPEG", quality=JPEG_QUALITY)
        counts[shot.folder] += 1
    return counts


def _validate(seed: int, num_train_ids: int, num_test_ids: int, num_distractors: int,
              num_cameras: int, images_per_id: int, height: int, width: int,
              difficulty: float) -> Dict[str, object]:
    ints = dict(seed=seed, num_train_ids=num_train_ids, num_test_ids=num_test_ids,
                num_distractors=num_distractors, num_cameras=num_cameras,
                images_per_id=images_per_id, height=height, width=width)
    for name, value in ints.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if num_train_ids < 1 or num_test_ids < 1:
        raise ValueError("num_train_ids and num_test_ids must be >= 1, "
                         f"got {num_train_ids} and {num_test_ids}")
    if num_train_ids + num_test_ids > MAX_PID:
        raise ValueError(f"num_train_ids + num_test_ids must be <= {MAX_PID} (Market-1501 pids), "
                         f"got {num_train_ids + num_test_ids}")
    if num_distractors < 0:
        raise ValueError(f"num_distractors must be >= 0, got {num_distractors}")
    if not 2 <= num_cameras <= MAX_CAMERAS:
        raise ValueError(f"num_cameras must be in 2..{MAX_CAMERAS} (Market-1501 names), "
                         f"got {num_cameras}")
    if images_per_id < 3:
        raise ValueError("images_per_id must be >= 3 (a query plus gallery images in two "
                         f"cameras), got {images_per_id}")
    if height < 32 or width < 16 or height % 2 or width % 2:
        raise ValueError("height and width must be even and at least 32 x 16, "
                         f"got {height} x {width}")
    if not (isinstance(difficulty, (int, float)) and 0.0 <= difficulty <= 3.0):
        raise ValueError(f"difficulty must be a number in 0..3, got {difficulty!r}")
    params: Dict[str, object] = {name: int(value) for name, value in ints.items()}
    params["difficulty"] = float(difficulty)
    return params


def _read_marker(dataset_dir: str) -> Optional[Dict[str, object]]:
    """Our marker in ``dataset_dir``; None if absent. Raises if the file is not ours."""
    path = os.path.join(dataset_dir, MARKER_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError) as err:
        raise RuntimeError(f"cannot read {path} ({err}); refusing to touch {dataset_dir}") from err
    if not isinstance(marker, dict) or marker.get("generator") != _GENERATOR:
        raise RuntimeError(
            f"{path} was not written by {_GENERATOR}; refusing to touch {dataset_dir}")
    return marker


def _is_current(marker: Optional[Dict[str, object]], wanted: Dict[str, object]) -> bool:
    return marker is not None and all(marker.get(k) == wanted[k] for k in wanted)


def _check_ours(dataset_dir: str) -> Optional[Dict[str, object]]:
    """Marker of an existing ``dataset_dir`` (None if absent or empty); raises if not ours."""
    if not os.path.lexists(dataset_dir):
        return None
    if not os.path.isdir(dataset_dir):
        raise RuntimeError(f"{dataset_dir} exists and is not a folder; refusing to touch it")
    marker = _read_marker(dataset_dir)
    if marker is None and os.listdir(dataset_dir):
        raise RuntimeError(
            f"{dataset_dir} exists but has no {MARKER_FILE}: it was not generated by "
            f"{_GENERATOR} (maybe it is real data); refusing to touch it. Move it away or pass "
            "another folder.")
    return marker


def _temp_pattern(dataset_dir: str) -> re.Pattern:
    base = re.escape(os.path.basename(dataset_dir))
    return re.compile(rf"^\.{base}\.(?:partial|old)-(\d+)-[0-9a-f]+$")


def _temp_sibling(dataset_dir: str, kind: str) -> str:
    parent, base = os.path.split(dataset_dir)
    return os.path.join(parent, f".{base}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:12]}")


def _remove_stale_temps(dataset_dir: str) -> None:
    """Remove temporary siblings left by generations whose process is gone (killed runs)."""
    parent = os.path.dirname(dataset_dir)
    pattern = _temp_pattern(dataset_dir)
    for name in sorted(os.listdir(parent)):
        match = pattern.match(name)
        if match and not pid_alive(int(match.group(1))):
            logger.warning("removing %s, left by an interrupted synthetic dataset generation",
                           os.path.join(parent, name))
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _install(temp_dir: str, dataset_dir: str, wanted: Dict[str, object]) -> None:
    """Move the finished ``temp_dir`` into place, replacing only an outdated dataset of ours."""
    marker = _check_ours(dataset_dir)
    if _is_current(marker, wanted):  # another process finished the same dataset first
        shutil.rmtree(temp_dir)
        return
    old = None
    if os.path.isdir(dataset_dir):
        old = _temp_sibling(dataset_dir, "old")
        os.rename(dataset_dir, old)
    os.rename(temp_dir, dataset_dir)
    if old is not None:
        shutil.rmtree(old)


GENERATION_WAIT_S = 3600  # how long a second process waits for another's generation of a folder


def generate_synthetic_market(dataset_dir: str, *, seed: int = 0, num_train_ids: int = 64,
                              num_test_ids: int = 64, num_distractors: int = 100,
                              num_cameras: int = 6, images_per_id: int = 8, height: int = 128,
                              width: int = 64, difficulty: float = 1.0) -> str:
    """Write (once) a synthetic Market-1501-format dataset into ``dataset_dir``; returns its path.

    ``dataset_dir`` gets ``bounding_box_train/``, ``query/`` and ``bounding_box_test/`` with
    ``{pid:04d}_c{cam}s1_{frame:06d}_00.jpg`` files (distractors use pid 0000) and a
    ``generation.json`` marker. A folder whose marker matches the arguments is reused as is; one
    generated with other arguments is regenerated; a non-empty folder without our marker raises.
    ``difficulty`` scales every nuisance (camera, pose, occlusion, clutter); 0 turns them off.
    """
    params = _validate(seed, num_train_ids, num_test_ids, num_distractors, num_cameras,
                       images_per_id, height, width, difficulty)
    dataset_dir = os.path.abspath(os.fspath(dataset_dir))
    wanted = {"format_version": FORMAT_VERSION, "generator": _GENERATOR, "params": params}
    marker = _check_ours(dataset_dir)
    if _is_current(marker, wanted):
        logger.debug("synthetic dataset %s is up to date", dataset_dir)
        return dataset_dir
    if marker is not None:
        logger.warning("synthetic dataset %s was generated with other settings (%s); regenerating "
                       "it with %s", dataset_dir, marker.get("params"), params)
    os.makedirs(os.path.dirname(dataset_dir), exist_ok=True)
    parent, base = os.path.split(dataset_dir)
    # one generator per folder at a time; a second one waits, then finds the dataset made
    with PidLock(os.path.join(parent, f".{base}.lock"),
                 what=f"synthetic dataset {dataset_dir}").acquire(wait_s=GENERATION_WAIT_S):
        if _is_current(_check_ours(dataset_dir), wanted):
            return dataset_dir
        _generate(dataset_dir, params, wanted)
    return dataset_dir


def _generate(dataset_dir: str, params: Dict[str, object], wanted: Dict[str, object]) -> None:
    _remove_stale_temps(dataset_dir)
    start = time.perf_counter()
    temp_dir = _temp_sibling(dataset_dir, "partial")
    os.makedirs(temp_dir)
    try:
        counts = _write_images(temp_dir, params)
        with open(os.path.join(temp_dir, MARKER_FILE), "w", encoding="utf-8") as f:
            json.dump({**wanted, "counts": counts}, f, indent=2, sort_keys=True)
            f.write("\n")
        _install(temp_dir, dataset_dir, wanted)
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    logger.info("generated synthetic dataset %s in %.1f s: %s", dataset_dir,
                time.perf_counter() - start, counts)


def dataset_folder_name(base: str = "SyntheticReID", *, seed: int = 0, num_train_ids: int = 64,
                        num_test_ids: int = 64, num_distractors: int = 100, num_cameras: int = 6,
                        images_per_id: int = 8, height: int = 128, width: int = 64,
                        difficulty: float = 1.0) -> str:
    """The folder of one dataset: `base` for the default sizes, `base` + the settings otherwise, so
    a run asking for other sizes never regenerates a dataset another run is reading."""
    params = _validate(seed, num_train_ids, num_test_ids, num_distractors, num_cameras,
                       images_per_id, height, width, difficulty)
    if params == _validate(0, 64, 64, 100, 6, 8, 128, 64, 1.0):
        return base
    return (f"{base}-s{seed}-ids{num_train_ids}+{num_test_ids}-dis{num_distractors}"
            f"-cam{num_cameras}-img{images_per_id}-{height}x{width}-diff{float(difficulty):g}")
