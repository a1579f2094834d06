"""One synthetic image: a person (or a distractor) in a camera's scene, with occlusion, clutter
and the camera's degradations, drawn at 2x and box-filtered down."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
from PIL import Image, ImageFilter

from adaptive_l2.data.synthetic.appearance import (UPPER_WEIGHTS, Identity, palette_colour,
                                                   random_identity)
from adaptive_l2.data.synthetic.figure import paint_person, random_pose
from adaptive_l2.data.synthetic.scene import SUPERSAMPLE, Camera


def _span(centre: float, half: float, size: int) -> slice:
    return slice(max(0, int(np.floor(centre - half))), min(size, int(np.ceil(centre + half)) + 1))


def _background(rng: np.random.Generator, camera: Camera, h: int, w: int, difficulty: float,
                shapes: float) -> np.ndarray:
    """A random crop of the camera's scene, with random shapes (clutter) drawn on it."""
    bh, bw, _ = camera.background.shape
    y0, x0 = int(rng.integers(0, bh - h + 1)), int(rng.integers(0, bw - w + 1))
    canvas = camera.background[y0:y0 + h, x0:x0 + w].copy()
    for _ in range(int(rng.poisson(shapes * difficulty))):
        colour = palette_colour(rng, UPPER_WEIGHTS)[1]
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


def _occlude(rng: np.random.Generator, canvas: np.ndarray, camera: Camera,
             difficulty: float) -> None:
    """Maybe cover part of the image: an object from the bottom / side, a pole or another person."""
    h, w = canvas.shape[:2]
    if rng.random() >= min(0.45 * difficulty, 0.9):
        return
    kind = rng.choice(3, p=[0.4, 0.3, 0.3])
    if kind == 0:
        colour = np.asarray(palette_colour(rng, UPPER_WEIGHTS)[1], dtype=np.float32)
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
        other = random_identity(rng)
        pose = random_pose(rng, h, w, other, camera, difficulty)
        offset = rng.uniform(0.4, 0.65) * w * (1 if rng.random() < 0.5 else -1)
        paint_person(canvas, other, replace(pose, cx=pose.cx + offset), camera.light)


def _finish(rng: np.random.Generator, canvas: np.ndarray, camera: Camera, out_h: int, out_w: int,
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


def render_person_image(rng: np.random.Generator, person: Identity, camera: Camera,
                         out_h: int, out_w: int, difficulty: float) -> Image.Image:
    h, w = out_h * SUPERSAMPLE, out_w * SUPERSAMPLE
    canvas = _background(rng, camera, h, w, difficulty, shapes=2.0)
    paint_person(canvas, person, random_pose(rng, h, w, person, camera, difficulty), camera.light)
    _occlude(rng, canvas, camera, difficulty)
    return _finish(rng, canvas, camera, out_h, out_w, difficulty)


def render_distractor(rng: np.random.Generator, camera: Camera, out_h: int, out_w: int,
                       difficulty: float) -> Image.Image:
    """A Market-style junk detection: background only, a badly cropped person, or a stranger."""
    h, w = out_h * SUPERSAMPLE, out_w * SUPERSAMPLE
    kind = rng.choice(3, p=[0.3, 0.35, 0.35])
    canvas = _background(rng, camera, h, w, max(difficulty, 0.5), shapes=5.0)
    if kind > 0:
        stranger = random_identity(rng)
        pose = random_pose(rng, h, w, stranger, camera, difficulty)
        if kind == 1:  # zoomed in on a part of a body
            zoom = rng.uniform(1.4, 2.4)
            pose = replace(pose, height_px=pose.height_px * zoom,
                           top=pose.top - rng.uniform(0.0, 0.6) * pose.height_px * zoom,
                           cx=pose.cx + rng.normal(0.0, 0.2) * w)
        paint_person(canvas, stranger, pose, camera.light)
    _occlude(rng, canvas, camera, difficulty)
    return _finish(rng, canvas, camera, out_h, out_w, difficulty)
