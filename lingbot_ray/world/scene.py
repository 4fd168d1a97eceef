"""A seeded procedural world: floor, sky and textured solids (boxes, vertical cylinders, spheres).

World conventions are those of :mod:`lingbot_ray.control.camera`: OpenCV-style axes with y pointing
*down*, so the horizontal plane is x-z, "up" is −y, and the floor is the plane ``y = +eye_height``
under a camera that starts at the origin looking along +z. Every solid stands on the floor.

Each primitive answers three questions for the renderer, all vectorised over rays or points:

* ``intersect(origin [3], dirs, inv_dirs) -> t [...]``: ``dirs`` are unit ray directions given as
  planar ``(x, y, z)`` components (each ``[...]``), ``inv_dirs`` their reciprocals; ``t`` is the
  distance to the first surface hit at ``t > NEAR`` (``inf`` where none). From inside a solid that
  is the far side, so a camera that walks into an object sees its inner walls, not through them.
* ``normal(points [M, 3]) -> [M, 3]``: outward unit normal of a surface point.
* ``surface_uv(points, normals) -> (u, v)``: 2-D texture coordinates in world units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from .textures import PATTERNS, hsv

NEAR = 1e-3
EYE_HEIGHT = 0.4
FREE_RADIUS = 0.4  # no solid comes closer than this (horizontally) to the start position
WORLD_RADIUS = 7.0

_INF = np.float32(np.inf)


@dataclass(frozen=True, eq=False)
class Material:
    """Two colours (float32 RGB in [0, 1]) mixed by ``pattern`` with cells of ``scale`` units."""

    colors: np.ndarray
    pattern: str
    scale: float


Planar = tuple[np.ndarray, np.ndarray, np.ndarray]  # x, y, z components, each [...] (contiguous)


def _nearest(*candidates: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Smallest candidate distance that is valid and beyond NEAR; ``inf`` where none is."""
    best = None
    for t, valid in candidates:
        t = np.where(valid & (t > NEAR), t, _INF)
        best = t if best is None else np.minimum(best, t)
    return best


@dataclass(frozen=True, eq=False)
class Box:
    """Axis-aligned box ``lo <= p <= hi``."""

    lo: np.ndarray
    hi: np.ndarray
    material: Material

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return self.lo, self.hi

    def intersect(self, origin: np.ndarray, dirs: Planar, inv_dirs: Planar) -> np.ndarray:
        t_in = t_out = None
        for axis in range(3):
            t1 = (self.lo[axis] - origin[axis]) * inv_dirs[axis]
            t2 = (self.hi[axis] - origin[axis]) * inv_dirs[axis]
            near, far = np.minimum(t1, t2), np.maximum(t1, t2)
            t_in = near if t_in is None else np.maximum(t_in, near)
            t_out = far if t_out is None else np.minimum(t_out, far)
        t = np.where(t_in > NEAR, t_in, t_out)  # from inside, the far side
        return np.where((t_out >= t_in) & (t > NEAR), t, _INF)

    def normal(self, points: np.ndarray) -> np.ndarray:
        centre = (self.lo + self.hi) / 2
        rel = (points - centre) / ((self.hi - self.lo) / 2)
        axis = np.abs(rel).argmax(axis=-1)
        n = np.zeros_like(points)
        rows = np.arange(len(points))
        n[rows, axis] = np.sign(rel[rows, axis])
        return n

    def surface_uv(self, points: np.ndarray, normals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Side faces: u runs along the face horizontally, v = height. Top face: u = x, v = z.
        p = points - self.lo
        top = normals[:, 1] != 0
        u = np.where(normals[:, 0] != 0, p[:, 2], p[:, 0])
        v = np.where(top, p[:, 2], p[:, 1])
        return u, v


@dataclass(frozen=True, eq=False)
class Cylinder:
    """Vertical cylinder of ``radius`` around ``(cx, cz)`` from ``y_top`` down to ``y_bottom``."""

    cx: float
    cz: float
    radius: float
    y_top: float
    y_bottom: float
    material: Material

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        r = self.radius
        return (
            np.array([self.cx - r, self.y_top, self.cz - r], np.float32),
            np.array([self.cx + r, self.y_bottom, self.cz + r], np.float32),
        )

    def intersect(self, origin: np.ndarray, dirs: Planar, inv_dirs: Planar) -> np.ndarray:
        fx, fz = origin[0] - self.cx, origin[2] - self.cz
        dx, dy, dz = dirs
        a = dx * dx + dz * dz + np.float32(1e-12)
        b = fx * dx + fz * dz
        c = fx * fx + fz * fz - self.radius**2
        disc = b * b - a * c
        root = np.sqrt(np.maximum(disc, 0))
        t_in, t_out = (-b - root) / a, (-b + root) / a
        y_in, y_out = origin[1] + t_in * dy, origin[1] + t_out * dy
        side = disc >= 0
        t_cap = (self.y_top - origin[1]) * inv_dirs[1]
        cap_x, cap_z = fx + t_cap * dx, fz + t_cap * dz
        on_cap = cap_x * cap_x + cap_z * cap_z <= self.radius**2
        return _nearest(
            (t_in, side & (y_in >= self.y_top) & (y_in <= self.y_bottom)),
            (t_out, side & (y_out >= self.y_top) & (y_out <= self.y_bottom)),
            (t_cap, on_cap),
        )

    def normal(self, points: np.ndarray) -> np.ndarray:
        n = np.zeros_like(points)
        n[:, 0] = points[:, 0] - self.cx
        n[:, 2] = points[:, 2] - self.cz
        n /= np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-6)
        cap = points[:, 1] <= self.y_top + 1e-4
        n[cap] = (0.0, -1.0, 0.0)
        return n

    def surface_uv(self, points: np.ndarray, normals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Arc length around the axis (rounded so a whole number of cells fits the circumference).
        angle = np.arctan2(points[:, 0] - self.cx, points[:, 2] - self.cz)
        circumference = 2 * math.pi * self.radius
        cells = max(2, 2 * round(circumference / self.material.scale / 2))
        u = (angle / (2 * math.pi) + 0.5) * cells * self.material.scale
        v = points[:, 1] - self.y_top
        cap = normals[:, 1] != 0
        return np.where(cap, points[:, 0] - self.cx, u), np.where(cap, points[:, 2] - self.cz, v)


@dataclass(frozen=True, eq=False)
class Sphere:
    """Sphere of ``radius`` around ``centre``."""

    centre: np.ndarray
    radius: float
    material: Material

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return self.centre - self.radius, self.centre + self.radius

    def intersect(self, origin: np.ndarray, dirs: Planar, inv_dirs: Planar) -> np.ndarray:
        f = origin - self.centre
        b = dirs[0] * f[0] + dirs[1] * f[1] + dirs[2] * f[2]
        c = float(f @ f) - self.radius**2
        disc = b * b - c
        root = np.sqrt(np.maximum(disc, 0))
        hit = disc >= 0
        return _nearest((-b - root, hit), (-b + root, hit))

    def normal(self, points: np.ndarray) -> np.ndarray:
        return (points - self.centre) / self.radius

    def surface_uv(self, points: np.ndarray, normals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Longitude and latitude as arc lengths: a beach-ball of whole cells around the equator.
        cells = max(4, 2 * round(2 * math.pi * self.radius / self.material.scale / 2))
        longitude = np.arctan2(normals[:, 0], normals[:, 2]) / (2 * math.pi) + 0.5
        latitude = np.arcsin(np.clip(normals[:, 1], -1, 1))
        return longitude * cells * self.material.scale, latitude * self.radius


Primitive = Box | Cylinder | Sphere


@dataclass(frozen=True, eq=False)
class Sky:
    """Sky gradient, sun, clouds and a distant mountain silhouette (all infinitely far away)."""

    horizon: np.ndarray
    zenith: np.ndarray
    sun_dir: np.ndarray  # unit vector towards the sun (world axes: its y is negative, i.e. up)
    sun_color: np.ndarray
    cloud_color: np.ndarray
    cloud_cover: float  # 0 clear … 1 overcast
    cloud_scale: float
    cloud_phases: np.ndarray  # [4] radians, so no two skies share the same clouds
    mountain_colors: np.ndarray  # [2, 3]: far range, near range
    mountain_waves: np.ndarray  # [2, K, 3]: (integer frequency, amplitude in radians, phase) per range
    mountain_base: np.ndarray  # [2]: mean height of each range in radians


@dataclass(frozen=True, eq=False)
class World:
    """Everything needed to render one seeded world (see the module docstring for the axes)."""

    seed: int
    eye_height: float
    floor_colors: np.ndarray  # [2, 3] checker colours
    grout_color: np.ndarray
    floor_tile: float
    sky: Sky
    fog_distance: float
    ambient: float
    objects: tuple[Primitive, ...] = field(default_factory=tuple)

    @classmethod
    def from_seed(cls, seed: int) -> World:
        """A deterministic world for ``seed``; equal seeds give identical worlds."""
        return _build_world(int(seed))

    @cached_property
    def object_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned bounds ``(lo [K, 3], hi [K, 3])`` of every object."""
        if not self.objects:
            return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32)
        lo, hi = zip(*(obj.bounds() for obj in self.objects), strict=True)
        return np.stack(lo).astype(np.float32), np.stack(hi).astype(np.float32)


def _material(rng: np.random.Generator, patterns: tuple[str, ...] = PATTERNS) -> Material:
    hue = rng.random()
    base = hsv(hue, rng.uniform(0.35, 0.9), rng.uniform(0.55, 0.95))
    if rng.random() < 0.5:  # same hue, different brightness
        other = hsv(hue + rng.uniform(-0.05, 0.05), rng.uniform(0.1, 0.6), rng.uniform(0.15, 0.4))
    else:  # a second hue
        other = hsv(hue + rng.uniform(0.25, 0.75), rng.uniform(0.3, 0.8), rng.uniform(0.3, 0.9))
    pattern = str(rng.choice(patterns))
    return Material(np.stack([base, other]), pattern, float(rng.uniform(0.06, 0.2)))


def _sky(rng: np.random.Generator) -> Sky:
    hue = rng.uniform(0.5, 0.7) if rng.random() < 0.75 else rng.uniform(0.0, 1.0)
    horizon = hsv(hue + rng.uniform(-0.08, 0.08), rng.uniform(0.1, 0.35), rng.uniform(0.85, 1.0))
    zenith = hsv(hue, rng.uniform(0.45, 0.85), rng.uniform(0.6, 0.9))
    azimuth = rng.uniform(-math.pi, math.pi)
    elevation = rng.uniform(0.15, 0.6)
    sun_dir = np.array(
        [math.cos(elevation) * math.sin(azimuth), -math.sin(elevation), math.cos(elevation) * math.cos(azimuth)],
        np.float32,
    )
    mountain_hue = rng.uniform(0.0, 1.0)
    far = 0.55 * hsv(mountain_hue, rng.uniform(0.15, 0.4), rng.uniform(0.55, 0.8)) + 0.45 * horizon
    near = hsv(mountain_hue + rng.uniform(-0.1, 0.1), rng.uniform(0.3, 0.6), rng.uniform(0.3, 0.55))
    waves = np.zeros((2, 5, 3), np.float32)
    for r, amplitude in enumerate((0.05, 0.035)):
        waves[r, :, 0] = rng.choice(np.arange(2, 24), size=5, replace=False)
        waves[r, :, 1] = amplitude * rng.uniform(0.3, 1.0, size=5) / np.sqrt(np.arange(1, 6))
        waves[r, :, 2] = rng.uniform(0, 2 * math.pi, size=5)
    return Sky(
        horizon=horizon,
        zenith=zenith,
        sun_dir=sun_dir,
        sun_color=hsv(rng.uniform(0.08, 0.16), rng.uniform(0.1, 0.4), 1.0),
        cloud_color=hsv(hue, 0.05, rng.uniform(0.9, 1.0)),
        cloud_cover=float(rng.uniform(0.15, 0.6)),
        cloud_scale=float(rng.uniform(0.6, 1.6)),
        cloud_phases=rng.uniform(0, 2 * math.pi, size=4).astype(np.float32),
        mountain_colors=np.stack([far, near]).astype(np.float32),
        mountain_waves=waves,
        mountain_base=np.array([rng.uniform(0.07, 0.12), rng.uniform(0.02, 0.06)], np.float32),
    )


def _footprint_radius(kind: str, size: np.ndarray) -> float:
    return float(np.hypot(size[0], size[1]) / 2) if kind == "box" else float(size[0])


def _place(
    rng: np.random.Generator,
    placed: list[tuple[float, float, float]],
    radius: float,
    *,
    angle_range: tuple[float, float],
    distance_range: tuple[float, float],
) -> tuple[float, float] | None:
    """A footprint centre (x, z) of ``radius`` that keeps clear of the start and of ``placed``."""
    for _ in range(40):
        angle = rng.uniform(*angle_range)
        distance = rng.uniform(*distance_range) + radius
        x, z = distance * math.sin(angle), distance * math.cos(angle)
        if math.hypot(x, z) - radius < FREE_RADIUS:
            continue
        if all(math.hypot(x - px, z - pz) > radius + pr + 0.08 for px, pz, pr in placed):
            return x, z
    return None


def _solid(rng: np.random.Generator, kind: str, x: float, z: float, size: np.ndarray, h: float) -> Primitive:
    material = _material(rng)
    if kind == "box":
        top = h - size[2]
        lo = np.array([x - size[0] / 2, top, z - size[1] / 2], np.float32)
        hi = np.array([x + size[0] / 2, h, z + size[1] / 2], np.float32)
        return Box(lo, hi, material)
    if kind == "cylinder":
        return Cylinder(x, z, float(size[0]), float(h - size[2]), h, material)
    radius = float(size[0])
    return Sphere(np.array([x, h - radius, z], np.float32), radius, material)


def _random_size(rng: np.random.Generator, kind: str) -> np.ndarray:
    """(width, depth, height) of a box; (radius, radius, height) of a cylinder or sphere."""
    if kind == "box":
        return np.array([rng.uniform(0.15, 0.7), rng.uniform(0.15, 0.7), rng.uniform(0.2, 1.3)])
    if kind == "cylinder":
        r = rng.uniform(0.06, 0.22)
        return np.array([r, r, rng.uniform(0.4, 1.8)])
    r = rng.uniform(0.1, 0.3)
    return np.array([r, r, 2 * r])


def _build_world(seed: int) -> World:
    rng = np.random.default_rng([seed, 0x5CE7E])
    h = EYE_HEIGHT
    floor_hue = rng.random()
    floor_a = hsv(floor_hue, rng.uniform(0.15, 0.6), rng.uniform(0.4, 0.65))
    floor_b = hsv(floor_hue + rng.uniform(-0.15, 0.15), rng.uniform(0.1, 0.5), rng.uniform(0.1, 0.28))
    if rng.random() < 0.5:
        floor_a, floor_b = floor_b, floor_a
    grout = hsv(floor_hue, 0.2, rng.uniform(0.05, 0.2) if rng.random() < 0.5 else rng.uniform(0.6, 0.8))

    objects: list[Primitive] = []
    placed: list[tuple[float, float, float]] = []

    def add(kind: str, angle_range: tuple[float, float], distance_range: tuple[float, float]) -> None:
        # Near solids are smaller, so that one of them rarely fills the view.
        distance = float(rng.uniform(*distance_range))
        size = _random_size(rng, kind) * float(np.clip((distance + 0.3) / 1.8, 0.4, 1.0))
        radius = _footprint_radius(kind, size)
        spot = _place(rng, placed, radius, angle_range=angle_range, distance_range=(distance, distance))
        if spot is not None:
            placed.append((*spot, radius))
            objects.append(_solid(rng, kind, *spot, size, h))

    kinds = ("box", "box", "cylinder", "sphere")
    # In front of the start view (±32° of +z, 0.4-3.5 units to the surface), then all around.
    for _ in range(int(rng.integers(4, 7))):
        add(str(rng.choice(kinds)), (-0.55, 0.55), (FREE_RADIUS, 3.5))
    for _ in range(int(rng.integers(14, 22))):
        add(str(rng.choice(kinds)), (-math.pi, math.pi), (0.5, WORLD_RADIUS - 1))
    # A few long walls further out.
    for _ in range(int(rng.integers(2, 5))):
        length, thickness, height = rng.uniform(1.5, 4.0), rng.uniform(0.08, 0.2), rng.uniform(0.5, 1.4)
        angle = rng.uniform(-math.pi, math.pi)
        distance = rng.uniform(3.5, WORLD_RADIUS)
        x, z = distance * math.sin(angle), distance * math.cos(angle)
        along_x = abs(math.cos(angle)) > abs(math.sin(angle))  # roughly facing the start
        width, depth = (length, thickness) if along_x else (thickness, length)
        lo = np.array([x - width / 2, h - height, z - depth / 2], np.float32)
        hi = np.array([x + width / 2, h, z + depth / 2], np.float32)
        # |x| or |z| >= 3.5/sqrt(2) along the wall's normal, so it always clears the start.
        objects.append(Box(lo, hi, _material(rng, ("bricks", "hstripes", "checks"))))

    return World(
        seed=seed,
        eye_height=h,
        floor_colors=np.stack([floor_a, floor_b]),
        grout_color=grout,
        floor_tile=float(rng.uniform(0.18, 0.4)),
        sky=_sky(rng),
        fog_distance=float(rng.uniform(7.0, 14.0)),
        ambient=float(rng.uniform(0.35, 0.5)),
        objects=tuple(objects),
    )
