"""Procedural surface patterns and colour helpers (numpy, float32, no state).

Patterns are functions of 2-D surface coordinates ``(u, v)`` in world units (arc length on curved
surfaces), so they stay fixed to the surface as the camera moves. A pattern returns the colour of
every point; the ``footprint`` argument (world size of one pixel at that point) fades the pattern
to its mean colour where it would alias, a cheap stand-in for mip-mapping.
"""

from __future__ import annotations

import colorsys

import numpy as np

PATTERNS = ("checks", "hstripes", "vstripes", "bricks")


def hsv(h: float, s: float, v: float) -> np.ndarray:
    """RGB float32 in [0, 1] from hue (turns, wraps), saturation and value."""
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), np.float32)


def hash01(a: np.ndarray, b: np.ndarray, salt: int) -> np.ndarray:
    """A deterministic pseudo-random float32 in [0, 1) per pair of integer cells (a, b)."""
    h = a.astype(np.int64).astype(np.uint32) * np.uint32(0x9E3779B1)
    h ^= b.astype(np.int64).astype(np.uint32) * np.uint32(0x85EBCA77)
    h ^= np.uint32(salt & 0xFFFFFFFF)
    h ^= h >> np.uint32(15)
    h *= np.uint32(0x2C1B3C6D)
    h ^= h >> np.uint32(12)
    h *= np.uint32(0x297A2D39)
    h ^= h >> np.uint32(15)
    return (h >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / (1 << 24))


def _fade(footprint: np.ndarray, cell: float) -> np.ndarray:
    """1 where a cell of size ``cell`` spans several pixels, falling to 0 as it nears one pixel."""
    return np.clip((0.7 - footprint / cell) / 0.4, 0.0, 1.0).astype(np.float32)


def pattern_color(
    kind: str,
    u: np.ndarray,
    v: np.ndarray,
    scale: float,
    colors: np.ndarray,
    footprint: np.ndarray,
    salt: int,
) -> np.ndarray:
    """Colour ``[M, 3]`` of pattern ``kind`` with cell size ``scale`` mixing ``colors[0]`` and ``colors[1]``.

    Every cell also gets a small brightness jitter (seeded by ``salt``), so flat areas are not flat.
    """
    iu = np.floor(u / scale)
    iv = np.floor(v / scale)
    if kind == "checks":
        mix = (iu + iv) % 2
    elif kind == "hstripes":
        mix = iv % 2
    elif kind == "vstripes":
        mix = iu % 2
    elif kind == "bricks":
        # Rows of height `scale`, bricks twice as long, every other row offset by half a brick;
        # mortar lines take colour 1, bricks colour 0.
        row = iv
        along = u / (2 * scale) + 0.5 * (row % 2)
        iu = np.floor(along)
        fu = along - iu
        fv = v / scale - row
        mortar = (fu < 0.06) | (fv < 0.12)
        mix = mortar.astype(np.float32)
    else:
        raise ValueError(f"unknown pattern {kind!r}; expected one of {PATTERNS}")
    mix = mix.astype(np.float32)
    jitter = 1.0 + 0.16 * (hash01(iu, iv, salt) - 0.5)
    fade = _fade(footprint, scale)
    mix = fade * mix + (1 - fade) * np.float32(0.5 if kind != "bricks" else 0.2)
    jitter = fade * jitter + (1 - fade)
    rgb = colors[0] + mix[:, None] * (colors[1] - colors[0])
    return rgb * jitter[:, None]


def floor_color(
    x: np.ndarray,
    z: np.ndarray,
    tile: float,
    colors: np.ndarray,
    grout: np.ndarray,
    footprint: np.ndarray,
    salt: int,
) -> np.ndarray:
    """Floor colour ``[M, 3]``: checker tiles of side ``tile`` with grout lines, per-tile jitter and a
    slow large-scale brightness swell (so distant floor still shows motion)."""
    u, v = x / tile, z / tile
    iu, iv = np.floor(u), np.floor(v)
    fu, fv = u - iu, v - iv
    mix = ((iu + iv) % 2).astype(np.float32)
    edge = np.minimum(np.minimum(fu, 1 - fu), np.minimum(fv, 1 - fv))
    is_grout = (edge < 0.04).astype(np.float32)
    jitter = 1.0 + 0.2 * (hash01(iu, iv, salt) - 0.5)
    fade = _fade(footprint, tile)
    mix = fade * mix + (1 - fade) * 0.5
    is_grout = fade * is_grout + (1 - fade) * 0.15
    jitter = fade * jitter + (1 - fade)
    rgb = colors[0] + mix[:, None] * (colors[1] - colors[0])
    rgb = rgb * jitter[:, None]
    rgb = rgb + is_grout[:, None] * (grout - rgb)
    swell = 1.0 + 0.08 * np.sin(0.9 * x + 0.4 * z) * np.sin(0.7 * z - 0.3 * x + salt % 7)
    return rgb * swell[:, None].astype(np.float32)
