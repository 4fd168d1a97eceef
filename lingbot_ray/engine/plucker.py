"""Conditioning poses → the Plücker map the camera adapter reads (docs/MODEL.md).

Per pixel (u, v) taken at its centre (+0.5): direction ``d = normalize(R·((u−cx)/fx, (v−cy)/fy, 1))``,
origin ``o = t``; 6 channels in the order ``[o, d]`` (as the original LingBot-World code
concatenates them); then a pixel-unshuffle by the VAE's spatial stride so the map lines up with the
latent grid: channel ``c·s² + r·s + q`` holds channel c at row offset r, column offset q of each s×s
cell (s = 8: ``c·64 + r·8 + q``), which is exactly ``torch.nn.functional.pixel_unshuffle``'s order.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..control.camera import Intrinsics


def plucker_map(
    c2w: np.ndarray | torch.Tensor,
    height: int,
    width: int,
    intrinsics: Intrinsics | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    downscale: int = 8,
) -> torch.Tensor:
    """Plücker rays of ``c2w [F, 4, 4]`` as ``[1, 6·downscale², F, H/downscale, W/downscale]``.

    ``intrinsics`` defaults to :meth:`Intrinsics.default` for this size. Maths runs in float32
    (float64 if asked for), then the result is cast to ``dtype``.
    """
    if height % downscale or width % downscale:
        raise ValueError(f"height {height} and width {width} must be multiples of {downscale}")
    if intrinsics is None:
        intrinsics = Intrinsics.default(width, height)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    poses = torch.as_tensor(c2w, dtype=work, device=device)
    if poses.ndim != 3 or tuple(poses.shape[1:]) != (4, 4):
        raise ValueError(f"c2w must have shape [F, 4, 4], got {tuple(poses.shape)}")

    # 1. Camera-space ray per pixel centre: [H, W, 3].
    v, u = torch.meshgrid(
        torch.arange(height, dtype=work, device=poses.device) + 0.5,
        torch.arange(width, dtype=work, device=poses.device) + 0.5,
        indexing="ij",
    )
    x = (u - intrinsics.cx) / intrinsics.fx
    y = (v - intrinsics.cy) / intrinsics.fy
    rays = torch.stack([x, y, torch.ones_like(u)], dim=-1)

    # 2. Rotate into the world and normalise; origins are the camera centres: [F, H, W, 3] each.
    directions = torch.einsum("fij,hwj->fhwi", poses[:, :3, :3], rays)
    directions = directions / directions.norm(dim=-1, keepdim=True)
    origins = poses[:, None, None, :3, 3].expand_as(directions)

    # 3. [F, 6, H, W] → unshuffle → [F, 6·s², H/s, W/s] → [1, C, F, h, w].
    plucker = torch.cat([origins, directions], dim=-1).permute(0, 3, 1, 2)
    plucker = F.pixel_unshuffle(plucker, downscale)
    return plucker.permute(1, 0, 2, 3).unsqueeze(0).to(dtype).contiguous()
