"""How a synthetic person is drawn: a pose, a figure of body parts, and the painting of each part
onto a canvas."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import numpy as np

from adaptive_l2.data.synthetic.appearance import VIEW_WEIGHTS, VIEWS, Colour, Identity, pick
from adaptive_l2.data.synthetic.scene import Camera


Point = Tuple[float, float]
Segment = Tuple[Point, Point]


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

    person: Identity
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


def _figure(person: Identity, pose: _Pose) -> _Figure:
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


def paint_person(canvas: np.ndarray, person: Identity, pose: _Pose, light: float) -> None:
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


def random_pose(rng: np.random.Generator, canvas_h: int, canvas_w: int, person: Identity,
                 camera: Camera, difficulty: float) -> _Pose:
    d = difficulty
    zoom = rng.uniform(1.0 - 0.08 * d, 1.0 + 0.05 * d)
    height_px = min(canvas_h * person.height * camera.scale * zoom, canvas_h * 1.02)
    return _Pose(
        top=(canvas_h - height_px) / 2 + rng.normal(0.0, 0.03 * d) * canvas_h,
        cx=canvas_w / 2 + rng.normal(0.0, 0.07 * d) * canvas_w,
        height_px=height_px,
        flip=bool(rng.random() < 0.5),
        lean=float(rng.normal(0.0, 0.04 * d)),
        view=pick(rng, VIEWS, VIEW_WEIGHTS),
        stride=float(rng.uniform()),
        swing=float(rng.uniform(-1.0, 1.0)),
    )
