"""Hypothesis strategies and helpers for the transport tests: small frame stacks, smooth images."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st


def _edited_stack(seed: int, num_frames: int, height: int, width: int) -> np.ndarray:
    # Each frame edits a random subset of the previous one, so deltas mix zero and non-zero bytes.
    rng = np.random.default_rng(seed)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    frames[0] = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    for i in range(1, num_frames):
        changed = rng.random((height, width, 3)) < rng.random()
        frames[i] = np.where(changed, rng.integers(0, 256, (height, width, 3), dtype=np.uint8), frames[i - 1])
    return frames


def frame_stacks(max_frames: int = 6, max_side: int = 12) -> st.SearchStrategy[np.ndarray]:
    return st.builds(
        _edited_stack,
        st.integers(0, 2**32 - 1),
        st.integers(1, max_frames),
        st.integers(1, max_side),
        st.integers(1, max_side),
    )


def smooth_frames(num_frames: int, height: int, width: int, phase: float) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for i in range(num_frames):
        t = phase + 0.3 * i
        frames[i, ..., 0] = 128 + 100 * np.sin(x / width * 3 + t)
        frames[i, ..., 1] = 128 + 100 * np.cos(y / height * 2 + t)
        frames[i, ..., 2] = 255 * (x + y) / (width + height)
    return frames


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)
