"""Image similarity for the consistency check: SSIM, PSNR and mean absolute difference.

All take two uint8 ``[H, W, 3]`` (or ``[H, W]``) images of the same shape. SSIM is the standard
definition (Wang et al. 2004): an 11×11 Gaussian window with σ = 1.5, K1 = 0.01, K2 = 0.03,
L = 255, statistics over every full window ("valid" positions, no padding), averaged over
positions and then over channels.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

WINDOW = 11
SIGMA = 1.5
K1, K2, DATA_RANGE = 0.01, 0.03, 255.0


def _check(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    if a.ndim != 3:
        raise ValueError(f"expected [H, W] or [H, W, C] images, got shape {a.shape}")
    return a.astype(np.float64), b.astype(np.float64)


def gaussian_window(size: int = WINDOW, sigma: float = SIGMA) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    kernel = np.exp(-(x**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def _blur(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering of ``[H, W, C]`` with the 1-D ``kernel`` along H then W."""
    x = sliding_window_view(x, len(kernel), axis=0) @ kernel
    return sliding_window_view(x, len(kernel), axis=1) @ kernel


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    x, y = _check(a, b)
    if min(x.shape[:2]) < WINDOW:
        raise ValueError(f"SSIM needs images of at least {WINDOW}x{WINDOW}, got {x.shape[1]}x{x.shape[0]}")
    kernel = gaussian_window()
    mu_x, mu_y = _blur(x, kernel), _blur(y, kernel)
    var_x = _blur(x * x, kernel) - mu_x**2
    var_y = _blur(y * y, kernel) - mu_y**2
    cov = _blur(x * y, kernel) - mu_x * mu_y
    c1, c2 = (K1 * DATA_RANGE) ** 2, (K2 * DATA_RANGE) ** 2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(index.mean(axis=(0, 1)).mean())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """In dB; ``inf`` for identical images."""
    x, y = _check(a, b)
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(DATA_RANGE**2 / mse)


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    x, y = _check(a, b)
    return float(np.mean(np.abs(x - y)))
