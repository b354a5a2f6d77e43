"""Procedural two-domain street scenes: the embedded data of ``plca demo`` and of the tests.

Every scene is a street seen from a car: sky, building facades with windows
along both sides of a road that runs to a vanishing point, sidewalks, poles
with traffic signs, trees and hedges, cars on the road and people on the
sidewalks. The *layout* of a scene (camera, street, objects) is drawn from the
same distribution in both domains; only the *rendering* differs:

- ``"source"`` looks like a game: a saturated palette, flat shading with a
  strong light direction, clean edges, no noise;
- ``"target"`` looks "real": a muted palette with a random white balance and
  exposure, per-material texture (asphalt grain, leaves, weathered walls,
  clouds), vignetting, a slight blur, sensor noise, and somewhat larger
  cars and people.

Shapes, positions, layout and structure (windows on facades, lane markings,
paving joints, blobby tree crowns, wheels under cars) are shared, so a model
that aligns the two domains' pixel features can recover most of the gap,
while colour alone transfers badly.

:func:`generate` writes the generic folder format read by the ``folder``
dataset: ``images/<name>.png``, ``labels/<name>.png`` (class index, 255 =
ignore), the split files ``{source,target}_{train,val}.txt``, ``classes.txt``
and ``meta.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from plca.files import atomic_path

#: The classes of the synthetic scenes (Cityscapes names, in Cityscapes train-id order).
SYNTHETIC_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "pole", "traffic sign", "vegetation", "sky", "person", "car",
)
ROAD, SIDEWALK, BUILDING, POLE, SIGN, VEGETATION, SKY, PERSON, CAR = range(len(SYNTHETIC_CLASSES))

DOMAINS: tuple[str, ...] = ("source", "target")
SPLITS: tuple[str, ...] = ("train", "val")

#: Bumped whenever the rendering changes, so stale generated data is detected by :func:`ensure_generated`.
GENERATOR_VERSION = 1

_MIN_SIZE = 16


# --------------------------------------------------------------------------------------------
# Layout: camera, street and objects (domain independent).


@dataclass(frozen=True)
class _Camera:
    """A pinhole camera looking along the street; world X right, Y up (metres), z depth."""

    horizon: float  # image row of the horizon (pixels)
    vp_x: float  # image column of the vanishing point
    focal: float  # pixels per metre at depth 1
    cam_h: float  # camera height above the ground (metres)

    def x(self, world_x: float, z: float) -> float:
        return self.vp_x + self.focal * world_x / z

    def y(self, world_y: float, z: float) -> float:
        return self.horizon + self.focal * (self.cam_h - world_y) / z


@dataclass(frozen=True)
class _Block:
    """One stretch of facade along a side of the street, from depth ``start`` to ``end``."""

    end: float
    height: float
    hedge: bool  # a hedge (vegetation) instead of a building
    pitch: tuple[float, float]  # window grid spacing along the street and in height (m)
    size: tuple[float, float]  # window size as a fraction of the pitch
    offset: tuple[float, float]


@dataclass(frozen=True)
class _Street:
    road: tuple[float, float]  # X of the left and right road edges
    walls: tuple[float, float]  # X of the left and right facades
    far: float  # depth of the wall that closes the street
    far_height: float
    blocks: tuple[tuple[_Block, ...], tuple[_Block, ...]]  # left side, right side
    markings: tuple[float, ...]  # X of dashed lane markings
    tile: float  # paving joint spacing on the sidewalks (m)


@dataclass(frozen=True)
class _Object:
    kind: str  # "car" | "person" | "pole" | "tree"
    x: float  # world X of the object's centre
    z: float  # depth of its front
    params: dict = field(default_factory=dict)


def _sample_blocks(rng: np.random.Generator, far: float) -> tuple[_Block, ...]:
    blocks, end = [], 0.0
    while end < far:
        end += rng.uniform(6.0, 25.0)
        hedge = bool(rng.random() < 0.15)
        blocks.append(_Block(
            end=end,
            height=rng.uniform(1.8, 3.0) if hedge else rng.uniform(6.0, 30.0),
            hedge=hedge,
            pitch=(rng.uniform(2.5, 4.5), rng.uniform(2.8, 3.6)),
            size=(rng.uniform(0.35, 0.7), rng.uniform(0.35, 0.6)),
            offset=(rng.uniform(0.0, 4.0), rng.uniform(0.0, 1.0)),
        ))
    return tuple(blocks)


def _sample_street(rng: np.random.Generator) -> _Street:
    road = (-rng.uniform(3.0, 6.5), rng.uniform(3.0, 6.5))
    walls = (road[0] - rng.uniform(1.5, 4.5), road[1] + rng.uniform(1.5, 4.5))
    far = rng.uniform(60.0, 150.0)
    n_lanes = int(rng.integers(1, 4))
    markings = tuple(road[0] + (road[1] - road[0]) * k / (n_lanes + 1) for k in range(1, n_lanes + 1))
    return _Street(road=road, walls=walls, far=far, far_height=rng.uniform(8.0, 30.0),
                   blocks=(_sample_blocks(rng, far), _sample_blocks(rng, far)),
                   markings=markings, tile=rng.uniform(0.8, 2.0))


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _on_sidewalk(rng: np.random.Generator, street: _Street, margin: float) -> float:
    """X of a random point on one of the sidewalks, at least ``margin`` from its edges."""
    side = int(rng.integers(2))
    inner, outer = street.road[side], street.walls[side]
    lo, hi = sorted((inner, outer))
    if hi - lo <= 2 * margin:
        return (lo + hi) / 2
    return rng.uniform(lo + margin, hi - margin)


def _sample_objects(rng: np.random.Generator, street: _Street) -> list[_Object]:
    objects = []
    for _ in range(int(rng.integers(1, 6))):
        x = rng.uniform(street.road[0] + 1.0, street.road[1] - 1.0)
        objects.append(_Object("car", x, _log_uniform(rng, 4.0, 50.0), {
            "width": rng.uniform(1.6, 2.0), "height": rng.uniform(1.35, 1.7),
            "cabin": rng.uniform(0.7, 0.9), "body": rng.uniform(0.5, 0.6)}))
    for _ in range(int(rng.integers(0, 6))):
        objects.append(_Object("person", _on_sidewalk(rng, street, 0.3), _log_uniform(rng, 4.0, 35.0), {
            "height": rng.uniform(1.55, 1.9), "width": rng.uniform(0.4, 0.55),
            "stride": rng.uniform(0.0, 0.25)}))
    for _ in range(int(rng.integers(1, 5))):
        side = int(rng.integers(2))
        x = street.road[side] + (0.4 if side else -0.4)
        objects.append(_Object("pole", x, _log_uniform(rng, 4.0, 50.0), {
            "height": rng.uniform(3.5, 8.0), "width": rng.uniform(0.12, 0.22),
            "sign": rng.random() < 0.7, "shape": int(rng.integers(3)), "color": int(rng.integers(3)),
            "sign_size": rng.uniform(0.5, 0.9), "sign_y": rng.uniform(2.2, 3.4)}))
    for _ in range(int(rng.integers(0, 5))):
        n_blobs = int(rng.integers(4, 8))
        objects.append(_Object("tree", _on_sidewalk(rng, street, 0.4), _log_uniform(rng, 5.0, 50.0), {
            "trunk": rng.uniform(0.2, 0.4), "crown_y": rng.uniform(3.5, 6.0),
            "radius": rng.uniform(1.2, 2.6),
            "blobs": rng.uniform(-1.0, 1.0, size=(n_blobs, 2)), "blob_r": rng.uniform(0.45, 0.8, n_blobs),
            "blob_shade": rng.uniform(0.75, 1.15, n_blobs)}))
    return objects


# --------------------------------------------------------------------------------------------
# Geometry rendering: a label map, a material map and a shading map.


class _Canvas:
    """Label map ``(H, W)``, material map ``(H, W)`` (index into ``kinds``) and shading ``(H, W)``."""

    def __init__(self, height: int, width: int) -> None:
        self.height, self.width = height, width
        self.labels = np.full((height, width), SKY, dtype=np.uint8)
        self.material = np.zeros((height, width), dtype=np.uint8)
        self.shade = np.ones((height, width), dtype=np.float32)
        self.kinds: list[str] = []

    def new_material(self, kind: str) -> int:
        if len(self.kinds) == 255:
            raise RuntimeError("too many materials in one synthetic scene")
        self.kinds.append(kind)
        return len(self.kinds) - 1

    def paint(self, box: tuple[float, float, float, float],
              mask_fn: Callable[[np.ndarray, np.ndarray], np.ndarray] | None,
              label: int, material: int, shade: float | np.ndarray = 1.0) -> None:
        """Paint the pixels of ``box = (x0, y0, x1, y1)`` whose centre is inside the box and ``mask_fn``.

        ``mask_fn(yy, xx)`` gets pixel-centre coordinates as a column ``(h, 1)`` and a row ``(1, w)``.
        """
        x0, y0, x1, y1 = box
        c0, c1 = max(int(np.ceil(x0 - 0.5)), 0), min(int(np.ceil(x1 - 0.5)), self.width)
        r0, r1 = max(int(np.ceil(y0 - 0.5)), 0), min(int(np.ceil(y1 - 0.5)), self.height)
        if c0 >= c1 or r0 >= r1:
            return
        window = np.s_[r0:r1, c0:c1]
        if mask_fn is None:
            mask = np.ones((r1 - r0, c1 - c0), dtype=bool)
        else:
            yy = np.arange(r0, r1, dtype=np.float32)[:, None] + 0.5
            xx = np.arange(c0, c1, dtype=np.float32)[None, :] + 0.5
            mask = np.broadcast_to(mask_fn(yy, xx), (r1 - r0, c1 - c0))
        self.labels[window][mask] = label
        self.material[window][mask] = material
        self.shade[window][mask] = shade if np.isscalar(shade) else np.broadcast_to(shade, mask.shape)[mask]

    def box(self, cx: float, y0: float, half_w: float, y1: float, label: int, material: int,
            shade: float = 1.0) -> None:
        """An axis-aligned box at least one pixel wide and tall."""
        half_w = max(half_w, 0.5)
        if y1 - y0 < 1.0:
            y0, y1 = (y0 + y1) / 2 - 0.5, (y0 + y1) / 2 + 0.5
        self.paint((cx - half_w, y0, cx + half_w, y1), None, label, material, shade)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, label: int, material: int,
                shade: float = 1.0) -> None:
        rx, ry = max(rx, 0.5), max(ry, 0.5)
        self.paint((cx - rx, cy - ry, cx + rx, cy + ry),
                   lambda yy, xx: ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0, label, material, shade)


def _paint_background(canvas: _Canvas, cam: _Camera, street: _Street) -> None:
    """Sky, far wall, road, sidewalks and the two facades, all in one vectorised pass."""
    h, w = canvas.height, canvas.width
    yy = np.arange(h, dtype=np.float32)[:, None] + 0.5
    xx = np.arange(w, dtype=np.float32)[None, :] + 0.5
    # Sky: brighter towards the horizon.
    canvas.shade[:] = np.clip(0.8 + 0.35 * yy / max(cam.horizon, 1.0), 0.8, 1.15)
    canvas.material[:] = canvas.new_material("sky")

    # The wall closing the street, at depth `far`.
    far = street.far
    wall_y = cam.cam_h - (yy - cam.horizon) * far / cam.focal
    wall_x = (xx - cam.vp_x) * far / cam.focal
    far_mask = (wall_y >= 0) & (wall_y <= street.far_height) & (wall_x >= street.walls[0]) & (
        wall_x <= street.walls[1])
    _fill(canvas, far_mask, BUILDING, canvas.new_material("facade"), 0.9)

    # Ground plane: road and sidewalks, with lane markings, curbs and paving joints.
    dy = np.maximum(yy - cam.horizon, 1e-3)
    below = yy > cam.horizon
    depth = cam.focal * cam.cam_h / dy
    ground_x = (xx - cam.vp_x) * cam.cam_h / dy
    ground = below & (depth < far) & (ground_x >= street.walls[0]) & (ground_x <= street.walls[1])
    road = ground & (ground_x >= street.road[0]) & (ground_x <= street.road[1])
    _fill(canvas, road, ROAD, canvas.new_material("road"))
    dash = np.mod(depth, 9.0) < 4.0
    marking = np.zeros_like(road)
    for x in street.markings:
        marking |= np.abs(ground_x - x) < 0.08
    _fill(canvas, road & marking & dash, ROAD, canvas.new_material("marking"))
    walk = ground & ~road
    _fill(canvas, walk, SIDEWALK, canvas.new_material("sidewalk"))
    joints = np.mod(depth, street.tile) < 0.08 * street.tile
    _fill(canvas, walk & joints, SIDEWALK, canvas.new_material("joint"))
    curb = walk & ((np.abs(ground_x - street.road[0]) < 0.18) | (np.abs(ground_x - street.road[1]) < 0.18))
    _fill(canvas, curb, SIDEWALK, canvas.new_material("curb"))

    # Facades, a vertical plane on each side; `along` is the depth of the column's facade point.
    window_material = canvas.new_material("window")
    for side, sign, light in ((0, -1.0, 1.0), (1, 1.0, 0.78)):
        wall = abs(street.walls[side])
        offset = sign * (xx[0] - cam.vp_x)  # > 0 on this side of the vanishing point
        cols = offset > 0
        along = np.where(cols, cam.focal * wall / np.maximum(offset, 1e-3), far + 1.0)
        cols &= along < far
        if not cols.any():
            continue
        blocks = street.blocks[side]
        index = np.minimum(np.searchsorted([b.end for b in blocks], along), len(blocks) - 1)
        per_block = np.array([[b.height, b.hedge, *b.pitch, *b.size, *b.offset] for b in blocks],
                             dtype=np.float32)[index]
        height, hedge = per_block[:, 0], per_block[:, 1] > 0
        world_y = cam.cam_h - (yy - cam.horizon) * along / cam.focal
        facade = cols & (world_y >= 0) & (world_y <= height)
        # One material per block, so each building gets its own colour.
        block_material = np.array([canvas.new_material("hedge" if b.hedge else "facade") for b in blocks],
                                  dtype=np.uint8)[index]
        labels = np.where(hedge, VEGETATION, BUILDING).astype(np.uint8)
        canvas.labels[facade] = np.broadcast_to(labels, facade.shape)[facade]
        canvas.material[facade] = np.broadcast_to(block_material, facade.shape)[facade]
        canvas.shade[facade] = light
        pitch_u, pitch_v, size_u, size_v, off_u, off_v = (per_block[:, k] for k in range(2, 8))
        in_u = np.mod(along - off_u, pitch_u) < size_u * pitch_u
        in_v = np.mod(world_y - off_v, pitch_v) < size_v * pitch_v
        windows = facade & ~hedge & in_u & in_v & (world_y > 2.5) & (world_y < height - 1.0)
        _fill(canvas, windows, BUILDING, window_material, light)


def _fill(canvas: _Canvas, mask: np.ndarray, label: int, material: int, shade: float | None = None) -> None:
    canvas.labels[mask] = label
    canvas.material[mask] = material
    if shade is not None:
        canvas.shade[mask] = shade


def _draw_car(canvas: _Canvas, cam: _Camera, obj: _Object, scale: float) -> None:
    p, z = obj.params, obj.z
    s = cam.focal / z * scale  # pixels per metre
    cx, ground = cam.x(obj.x, z), cam.y(0.0, z)
    half, top = p["width"] / 2 * s, ground - p["height"] * s
    body_top = ground - (0.25 + p["body"]) * p["height"] * s
    cabin_half = half * p["cabin"]
    body, glass = canvas.new_material("car_body"), canvas.new_material("car_glass")
    wheel, lamp = canvas.new_material("wheel"), canvas.new_material("lamp")
    wheel_w, wheel_h = 0.3 * p["width"] * s / 2, 0.28 * p["height"] * s
    for wx in (cx - half + wheel_w * 1.2, cx + half - wheel_w * 1.2):
        canvas.box(wx, ground - wheel_h, wheel_w, ground, CAR, wheel)
    canvas.box(cx, body_top, half, ground - 0.18 * p["height"] * s, CAR, body, 1.0)
    corner = 0.35 * (body_top - top)

    def cabin(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        # A box with rounded upper corners: inside unless in a corner square and outside its circle.
        dx = np.maximum(np.abs(xx - cx) - (cabin_half - corner), 0.0)
        dy = np.maximum(top + corner - yy, 0.0)
        return dx * dx + dy * dy <= corner * corner

    canvas.paint((cx - cabin_half, top, cx + cabin_half, body_top + 0.5), cabin, CAR, body, 1.12)
    inset = 0.15 * cabin_half
    canvas.box(cx, top + 0.2 * (body_top - top), cabin_half - inset, body_top - 0.1 * (body_top - top),
               CAR, glass)
    lamp_y = body_top + 0.15 * (ground - body_top)
    for lx in (cx - half * 0.82, cx + half * 0.82):
        canvas.box(lx, lamp_y, 0.12 * half, lamp_y + 0.12 * (ground - body_top), CAR, lamp)


def _draw_person(canvas: _Canvas, cam: _Camera, obj: _Object, scale: float) -> None:
    p, z = obj.params, obj.z
    s = cam.focal / z * scale
    cx, ground = cam.x(obj.x, z), cam.y(0.0, z)
    height, half = p["height"] * s, p["width"] / 2 * s
    skin, shirt, trousers = (canvas.new_material(k) for k in ("skin", "clothes", "trousers"))
    hip, shoulder = ground - 0.47 * height, ground - 0.82 * height
    leg = 0.38 * half
    spread = p["stride"] * half
    for lx in (cx - half * 0.45 - spread, cx + half * 0.45 + spread):
        canvas.box(lx, hip, leg, ground, PERSON, trousers, 0.9)
    canvas.paint((cx - half, shoulder, cx + half, hip + 0.05 * height),
                 lambda yy, xx: np.abs(xx - cx) <= half * (0.75 + 0.25 * np.clip((yy - shoulder) / (0.08 * height), 0, 1)),
                 PERSON, shirt, 1.05)
    head_r = 0.075 * height
    canvas.ellipse(cx, shoulder - head_r * 1.05, head_r * 0.85, head_r, PERSON, skin, 1.1)


def _draw_pole(canvas: _Canvas, cam: _Camera, obj: _Object, scale: float) -> None:
    p, z = obj.params, obj.z
    s = cam.focal / z
    cx, ground = cam.x(obj.x, z), cam.y(0.0, z)
    canvas.box(cx, ground - p["height"] * s, p["width"] / 2 * s * scale, ground, POLE, canvas.new_material("pole"))
    if not p["sign"]:
        return
    r = p["sign_size"] / 2 * s * scale
    cy = cam.y(p["sign_y"], z)
    face = canvas.new_material(("sign_red", "sign_blue", "sign_yellow")[p["color"]])
    border = canvas.new_material("sign_border")
    if p["shape"] == 0:
        canvas.ellipse(cx, cy, r, r, SIGN, border)
        canvas.ellipse(cx, cy, r * 0.78, r * 0.78, SIGN, face)
    elif p["shape"] == 1:
        canvas.box(cx, cy - r, r, cy + r, SIGN, border)
        canvas.box(cx, cy - r * 0.8, r * 0.8, cy + r * 0.8, SIGN, face)
    else:  # a triangle pointing up
        for k, material in ((1.0, border), (0.72, face)):
            rr = r * k

            def triangle(yy: np.ndarray, xx: np.ndarray, rr: float = rr) -> np.ndarray:
                return np.abs(xx - cx) <= (yy - (cy - rr)) / (2 * rr) * rr * 1.15

            canvas.paint((cx - rr * 1.15, cy - rr, cx + rr * 1.15, cy + rr), triangle, SIGN, material)


def _draw_tree(canvas: _Canvas, cam: _Camera, obj: _Object, scale: float) -> None:
    p, z = obj.params, obj.z
    s = cam.focal / z
    cx, ground = cam.x(obj.x, z), cam.y(0.0, z)
    crown_y, radius = cam.y(p["crown_y"], z), p["radius"] * s
    canvas.box(cx, crown_y, p["trunk"] / 2 * s, ground, VEGETATION, canvas.new_material("trunk"), 0.9)
    foliage = canvas.new_material("foliage")
    for (bx, by), br, shade in zip(p["blobs"], p["blob_r"], p["blob_shade"]):
        rr = br * radius
        canvas.ellipse(cx + bx * radius * 0.7, crown_y + by * radius * 0.6, rr, rr, VEGETATION, foliage, shade)


_DRAW = {"car": _draw_car, "person": _draw_person, "pole": _draw_pole, "tree": _draw_tree}


# --------------------------------------------------------------------------------------------
# Domain styles: colours per material kind, texture, global camera effects.


@dataclass(frozen=True)
class _Style:
    colors: dict[str, tuple[tuple[int, int, int], ...]]  # kind -> colours to choose from
    jitter: float  # std of a per-material multiplicative colour jitter
    shade_power: float  # how strongly the shading map acts (0 = none)
    texture: dict[str, tuple[float, float]]  # kind -> (fine grain, blotches) amplitude
    object_scale: dict[str, tuple[float, float]]  # object kind -> size multiplier range
    camera: bool  # white balance, exposure, vignetting, blur and sensor noise


_SOURCE = _Style(
    colors={
        "sky": ((60, 140, 255), (90, 170, 250)),
        "facade": ((205, 95, 60), (225, 185, 70), (90, 165, 205), (235, 220, 185), (175, 100, 185),
                   (120, 200, 140)),
        "window": ((35, 65, 135),),
        "road": ((95, 95, 115),),
        "marking": ((250, 250, 250),),
        "sidewalk": ((215, 170, 115),),
        "joint": ((165, 125, 85),),
        "curb": ((235, 235, 235),),
        "hedge": ((30, 150, 60),),
        "foliage": ((40, 175, 40),),
        "trunk": ((125, 75, 30),),
        "pole": ((165, 165, 180),),
        "sign_red": ((235, 20, 20),),
        "sign_blue": ((20, 70, 235),),
        "sign_yellow": ((250, 210, 0),),
        "sign_border": ((250, 250, 250),),
        "skin": ((245, 195, 150),),
        "clothes": ((230, 40, 40), (40, 90, 230), (250, 200, 30), (40, 200, 90), (240, 240, 240),
                    (150, 60, 200)),
        "trousers": ((40, 40, 130), (30, 30, 30), (120, 90, 50)),
        "car_body": ((220, 30, 30), (30, 80, 220), (250, 210, 20), (240, 240, 240), (30, 30, 30),
                     (30, 170, 70), (250, 130, 20)),
        "car_glass": ((50, 75, 110),),
        "wheel": ((25, 25, 25),),
        "lamp": ((255, 40, 40),),
    },
    jitter=0.04,
    shade_power=1.0,
    texture={},
    object_scale={"car": (0.9, 1.1), "person": (0.9, 1.1), "pole": (1.0, 1.0), "tree": (1.0, 1.0)},
    camera=False,
)

_TARGET = _Style(
    colors={
        "sky": ((195, 205, 218), (175, 190, 210), (210, 212, 215)),
        "facade": ((125, 115, 105), (150, 140, 125), (105, 100, 100), (165, 155, 145), (125, 92, 78),
                   (140, 135, 120)),
        "window": ((55, 60, 68),),
        "road": ((82, 82, 86),),
        "marking": ((195, 195, 185),),
        "sidewalk": ((145, 140, 132),),
        "joint": ((110, 105, 100),),
        "curb": ((170, 168, 160),),
        "hedge": ((62, 88, 42),),
        "foliage": ((72, 100, 45),),
        "trunk": ((72, 58, 46),),
        "pole": ((95, 97, 102),),
        "sign_red": ((175, 45, 45),),
        "sign_blue": ((45, 75, 155),),
        "sign_yellow": ((195, 165, 45),),
        "sign_border": ((205, 205, 200),),
        "skin": ((195, 155, 130),),
        "clothes": ((60, 60, 65), (110, 40, 40), (40, 55, 90), (150, 145, 135), (80, 90, 60),
                    (30, 30, 35)),
        "trousers": ((35, 35, 45), (60, 60, 70), (90, 80, 65)),
        "car_body": ((45, 45, 50), (180, 180, 185), (120, 125, 130), (205, 205, 208), (95, 35, 35),
                     (35, 45, 75)),
        "car_glass": ((40, 45, 52),),
        "wheel": ((22, 22, 22),),
        "lamp": ((165, 35, 35),),
    },
    jitter=0.08,
    shade_power=0.5,
    texture={
        "sky": (0.0, 0.06), "facade": (0.04, 0.12), "window": (0.08, 0.2), "road": (0.1, 0.08),
        "sidewalk": (0.07, 0.08), "joint": (0.07, 0.05), "hedge": (0.3, 0.15), "foliage": (0.3, 0.15),
        "trunk": (0.1, 0.05), "car_body": (0.02, 0.05),
    },
    object_scale={"car": (1.05, 1.35), "person": (1.0, 1.3), "pole": (1.1, 1.4), "tree": (1.0, 1.0)},
    camera=True,
)

_STYLES = {"source": _SOURCE, "target": _TARGET}


def _upsampled_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """Smooth noise ``(H, W)`` with unit std: a coarse random grid upsampled bilinearly."""
    coarse = rng.standard_normal((height // cell + 2, width // cell + 2)).astype(np.float32)
    image = Image.fromarray(coarse, mode="F").resize((width + 2 * cell, height + 2 * cell), Image.BILINEAR)
    field_ = np.asarray(image)[cell:cell + height, cell:cell + width]
    return (field_ - field_.mean()) / (field_.std() + 1e-6)


def _blur(image: np.ndarray, passes: int) -> np.ndarray:
    """Separable [1, 2, 1] / 4 binomial blur ``passes`` times, edges replicated; ``(H, W, C)``."""
    for _ in range(passes):
        padded = np.pad(image, ((1, 1), (0, 0), (0, 0)), mode="edge")
        image = (padded[:-2] + 2 * padded[1:-1] + padded[2:]) * 0.25
        padded = np.pad(image, ((0, 0), (1, 1), (0, 0)), mode="edge")
        image = (padded[:, :-2] + 2 * padded[:, 1:-1] + padded[:, 2:]) * 0.25
    return image


def _colorize(canvas: _Canvas, style: _Style, rng: np.random.Generator) -> np.ndarray:
    """The RGB image ``(H, W, 3) uint8`` of a painted canvas in ``style``."""
    h, w = canvas.height, canvas.width
    table = np.empty((len(canvas.kinds), 3), dtype=np.float32)
    for index, kind in enumerate(canvas.kinds):
        choices = style.colors[kind]
        base = np.asarray(choices[int(rng.integers(len(choices)))], dtype=np.float32)
        table[index] = base * np.clip(1.0 + style.jitter * rng.standard_normal(3), 0.6, 1.4)
    image = table[canvas.material] * (canvas.shade ** style.shade_power)[..., None]
    if style.texture:
        fine_amp = np.zeros(len(canvas.kinds), dtype=np.float32)
        blotch_amp = np.zeros(len(canvas.kinds), dtype=np.float32)
        for index, kind in enumerate(canvas.kinds):
            fine_amp[index], blotch_amp[index] = style.texture.get(kind, (0.03, 0.03))
        fine = rng.standard_normal((h, w), dtype=np.float32)
        blotches = _upsampled_noise(rng, h, w, 6)
        texture = 1.0 + fine_amp[canvas.material] * fine + blotch_amp[canvas.material] * blotches
        image *= np.clip(texture, 0.3, 2.0)[..., None]
    if style.camera:
        image = _camera_effects(image, rng)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def _camera_effects(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """White balance, exposure, gamma, vignetting, lens blur and sensor noise on ``(H, W, 3)`` in 0-255."""
    h, w, _ = image.shape
    white_balance = rng.uniform(0.85, 1.15, size=3).astype(np.float32)
    image = image * (white_balance / white_balance.mean() * rng.uniform(0.7, 1.2))
    image = 255.0 * (np.clip(image, 0, 255) / 255.0) ** rng.uniform(0.8, 1.25)
    yy = (np.arange(h, dtype=np.float32)[:, None] + 0.5) / h - 0.5
    xx = (np.arange(w, dtype=np.float32)[None, :] + 0.5) / w - 0.5
    image = image * (1.0 - rng.uniform(0.2, 0.5) * (xx * xx + yy * yy) * 2.0)[..., None]
    image = _blur(image, int(rng.integers(1, 3)))
    return image + rng.uniform(2.0, 7.0) * rng.standard_normal(image.shape, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Public API.


def render_scene(rng: np.random.Generator, domain: str, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Render one random street scene in ``domain`` ("source" or "target").

    Returns the image ``(H, W, 3) uint8`` (RGB) and its labels ``(H, W) uint8``: indices into
    :data:`SYNTHETIC_CLASSES`. The layout is drawn from the same distribution in both domains; only
    the rendering (palette, shading, texture, camera effects, object sizes) depends on ``domain``.
    """
    if domain not in _STYLES:
        raise ValueError(f"unknown synthetic domain {domain!r}; expected one of {DOMAINS}")
    if height < _MIN_SIZE or width < _MIN_SIZE:
        raise ValueError(f"synthetic scenes need height and width >= {_MIN_SIZE}, got {height} x {width}")
    style = _STYLES[domain]
    cam = _Camera(horizon=height * rng.uniform(0.36, 0.5), vp_x=width * rng.uniform(0.38, 0.62),
                  focal=width * rng.uniform(0.55, 0.75), cam_h=rng.uniform(1.3, 1.7))
    street = _sample_street(rng)
    objects = _sample_objects(rng, street)
    canvas = _Canvas(height, width)
    _paint_background(canvas, cam, street)
    for obj in sorted(objects, key=lambda o: -o.z):  # far to near
        low, high = style.object_scale[obj.kind]
        _DRAW[obj.kind](canvas, cam, obj, rng.uniform(low, high))
    return _colorize(canvas, style, rng), canvas.labels


def _image_rng(seed: int, domain: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, DOMAINS.index(domain), index])


def _meta(n_train: int, n_val: int, height: int, width: int, seed: int) -> dict:
    return {"generator": "plca.data.synthetic", "version": GENERATOR_VERSION, "n_train": n_train,
            "n_val": n_val, "height": height, "width": width, "seed": seed}


def _check_args(n_train: int, n_val: int, height: int, width: int, seed: int) -> None:
    for name, value, low in (("n_train", n_train, 1), ("n_val", n_val, 1), ("height", height, _MIN_SIZE),
                             ("width", width, _MIN_SIZE), ("seed", seed, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ValueError(f"synthetic data: {name} must be an integer >= {low}, got {value!r}")


def _write_dataset(folder: Path, n_train: int, n_val: int, height: int, width: int, seed: int) -> None:
    (folder / "images").mkdir()
    (folder / "labels").mkdir()
    for domain in DOMAINS:
        names = [f"{domain}_{index:06d}" for index in range(n_train + n_val)]
        for index, name in enumerate(names):
            image, labels = render_scene(_image_rng(seed, domain, index), domain, height, width)
            Image.fromarray(image, mode="RGB").save(folder / "images" / f"{name}.png", compress_level=1)
            Image.fromarray(labels, mode="L").save(folder / "labels" / f"{name}.png", compress_level=6)
        (folder / f"{domain}_train.txt").write_text("".join(f"{n}\n" for n in names[:n_train]))
        (folder / f"{domain}_val.txt").write_text("".join(f"{n}\n" for n in names[n_train:]))
    (folder / "classes.txt").write_text("".join(f"{name}\n" for name in SYNTHETIC_CLASSES))
    # meta.json last: its presence marks a finished dataset.
    (folder / "meta.json").write_text(json.dumps(_meta(n_train, n_val, height, width, seed), indent=2) + "\n")


def generate(root: str | Path, *, n_train: int = 600, n_val: int = 100, height: int = 128, width: int = 256,
             seed: int = 0) -> Path:
    """Write ``n_train + n_val`` scenes per domain to ``root`` in the generic folder format.

    Layout: ``images/<name>.png`` (RGB), ``labels/<name>.png`` (8-bit class index, 255 = ignore),
    ``source_train.txt``, ``source_val.txt``, ``target_train.txt``, ``target_val.txt`` (one name
    per line, e.g. ``source_000000``), ``classes.txt`` and ``meta.json``. The output depends only on
    the arguments (byte-identical files). The data is written to a temporary sibling folder that is
    renamed to ``root`` when complete, so an interrupted run never leaves a dataset that looks
    finished. Raises ``ValueError`` if ``root`` exists and is not an empty folder.
    """
    _check_args(n_train, n_val, height, width, seed)
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ValueError(f"cannot generate synthetic data in {root}: it exists and is not an empty folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(root, folder=True) as partial:  # renamed over an empty `root` folder too
        _write_dataset(partial, n_train, n_val, height, width, seed)
    return root


def generated_parameters(root: str | Path) -> dict[str, int]:
    """The :func:`generate` arguments of the finished dataset in ``root`` ({} when there is none or its
    meta.json cannot be read), so a reader can check it is current without knowing its scene seed."""
    try:
        meta = json.loads((Path(root) / "meta.json").read_text())
    except (OSError, ValueError):
        return {}
    keys = ("n_train", "n_val", "height", "width", "seed")
    return {key: meta[key] for key in keys if isinstance(meta, dict) and isinstance(meta.get(key), int)}


def ensure_generated(root: str | Path, **kwargs: int) -> Path:
    """Generate the synthetic data in ``root`` unless it is already there with the same parameters.

    ``kwargs`` are :func:`generate`'s keyword arguments. Raises ``ValueError`` if ``root`` holds a
    dataset made with different parameters (or another generator version), or something else.
    """
    root = Path(root)
    defaults = {"n_train": 600, "n_val": 100, "height": 128, "width": 256, "seed": 0}
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        raise ValueError(f"ensure_generated: unknown argument(s) {unknown}; known: {sorted(defaults)}")
    params = {**defaults, **kwargs}
    _check_args(**params)
    wanted = _meta(**params)
    meta_path = root / "meta.json"
    if meta_path.is_file():
        try:
            found = json.loads(meta_path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{meta_path} is not valid JSON ({error}); delete {root} to regenerate") from None
        if found != wanted:
            diff = ", ".join(f"{k}: {found.get(k)!r} there, {v!r} wanted" for k, v in wanted.items()
                             if found.get(k) != v)
            raise ValueError(f"{root} holds synthetic data made with other parameters ({diff}); "
                             f"use another data root or delete {root} to regenerate")
        return root
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ValueError(f"{root} exists but is not a finished synthetic dataset (no meta.json); "
                         f"use another data root or delete {root}")
    try:
        return generate(root, **params)
    except OSError:
        # Another process may have finished the same dataset first (the rename then fails).
        if meta_path.is_file() and json.loads(meta_path.read_text()) == wanted:
            return root
        raise
