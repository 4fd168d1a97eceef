"""SSIM / PSNR / mean abs diff against their definitions, computed the slow way."""

import math

import numpy as np
import pytest

from lingbot_ray.client.compare import (
    K1,
    K2,
    gaussian_window,
    mean_abs_diff,
    psnr,
    ssim,
)


def ssim_by_windows(a: np.ndarray, b: np.ndarray) -> float:
    """Per window position, the Gaussian-weighted statistics written out (no separable filtering)."""
    g = gaussian_window()
    w2 = np.outer(g, g)
    size = len(g)
    c1, c2 = (K1 * 255) ** 2, (K2 * 255) ** 2
    per_channel = []
    for ch in range(a.shape[2]):
        x, y = a[..., ch].astype(np.float64), b[..., ch].astype(np.float64)
        values = []
        for i in range(x.shape[0] - size + 1):
            for j in range(x.shape[1] - size + 1):
                px, py = x[i : i + size, j : j + size], y[i : i + size, j : j + size]
                mx, my = (w2 * px).sum(), (w2 * py).sum()
                vx, vy = (w2 * (px - mx) ** 2).sum(), (w2 * (py - my) ** 2).sum()
                cov = (w2 * (px - mx) * (py - my)).sum()
                values.append(((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
        per_channel.append(np.mean(values))
    return float(np.mean(per_channel))


def test_ssim_matches_the_windowed_definition():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (19, 23, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 40, a.shape), 0, 255).astype(np.uint8)
    assert ssim(a, b) == pytest.approx(ssim_by_windows(a, b), abs=1e-9)
    assert ssim(a, a) == pytest.approx(1.0)
    assert 0 < ssim(a, b) < 0.99


def test_ssim_falls_with_noise_and_rejects_bad_shapes():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    small = np.clip(a + rng.normal(0, 5, a.shape), 0, 255).astype(np.uint8)
    large = np.clip(a + rng.normal(0, 40, a.shape), 0, 255).astype(np.uint8)
    assert 1 > ssim(a, small) > ssim(a, large)
    with pytest.raises(ValueError, match="shape"):
        ssim(a, a[:-1])
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(a[:8, :8], a[:8, :8])


def test_psnr_and_mean_abs_diff_values():
    a = np.full((8, 8, 3), 100, np.uint8)
    b = a + np.uint8(5)
    assert psnr(a, a) == math.inf
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 25))
    assert mean_abs_diff(a, b) == 5.0
    assert mean_abs_diff(b, a) == 5.0  # no uint8 wrap-around
