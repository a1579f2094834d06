"""Where a synthetic person is seen: a campus backdrop and cameras that differ in colour cast,
exposure, blur, resolution and background."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np
from PIL import Image

from adaptive_l2.data.synthetic.appearance import LOWER_WEIGHTS, UPPER_WEIGHTS, palette_colour
from adaptive_l2.data.synthetic.streams import STREAM_CAMERA, STREAM_SCENE, random_stream


SUPERSAMPLE = 2  # draw at 2x and box-filter down, so stripes and edges are not jagged


@dataclass
class Camera:
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
    _, colour = palette_colour(rng, weights)
    mix = rng.uniform(0.1, 0.5)
    return mix * np.array(colour) + (1.0 - mix) * rng.uniform(0.3, 0.7)


def _wall(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """One stretch of wall: bricks, panels, windows, foliage or plain."""
    yy, xx = np.mgrid[0:h, 0:w]
    s = SUPERSAMPLE
    wall = np.broadcast_to(_muted(rng, UPPER_WEIGHTS), (h, w, 3)).copy()
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
        wall[inside] = _muted(rng, UPPER_WEIGHTS) * rng.uniform(0.5, 1.2)
    elif kind == 3:  # foliage
        leaf = _smooth_noise(rng, h, w, (10, max(2, w // 20)))[..., None] * 0.8
        green = np.array([0.22, 0.38, 0.2]) * rng.uniform(0.7, 1.3)
        wall = wall * (1.0 - leaf) + green * leaf
    return wall


def _place(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """One place along the walkway: a stretch of wall above a floor (pavement or tiles)."""
    yy, xx = np.mgrid[0:h, 0:w]
    horizon = int(h * rng.uniform(0.45, 0.75))
    floor = np.broadcast_to(_muted(rng, LOWER_WEIGHTS), (h, w, 3)).copy()
    if rng.random() < 0.5:  # tiles
        tile = int(rng.integers(8, 20)) * SUPERSAMPLE
        lines = (xx % tile < SUPERSAMPLE) | ((yy - horizon) % tile < SUPERSAMPLE)
        floor *= np.where(lines, 0.85, 1.0)[..., None]
    return np.where((yy < horizon)[..., None], _wall(rng, h, w), floor)


def make_campus(seed: int, h: int, w: int) -> np.ndarray:
    """The scene all cameras look into: a wide strip of places.

    Cameras see overlapping parts of it, so a background hints at the camera (as in real data)
    without identifying it, and images of one camera do not share one background.
    """
    rng = random_stream(seed, STREAM_SCENE)
    cuts = np.sort(rng.choice(np.arange(1, w), size=int(rng.integers(8, 13)), replace=False))
    bounds = [0, *cuts.tolist(), w]
    return np.concatenate([_place(rng, h, b - a) for a, b in zip(bounds[:-1], bounds[1:])], axis=1)


def make_camera(seed: int, index: int, campus: np.ndarray, view_w: int,
                difficulty: float) -> Camera:
    """Camera ``index``: its look, and the part of the campus it films (``view_w`` wide)."""
    rng = random_stream(seed, STREAM_CAMERA, index)
    d = difficulty
    h, w = campus.shape[:2]
    x0 = int(rng.integers(0, w - view_w + 1))
    light = 0.75 + 0.5 * _smooth_noise(rng, h, view_w, (4, max(2, view_w // 60)))
    return Camera(
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
