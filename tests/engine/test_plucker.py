import math

import numpy as np
import pytest
import torch

from lingbot_ray.control import CameraTrajectory, Intrinsics
from lingbot_ray.engine.plucker import plucker_map


def random_poses(num, seed=0):
    rng = np.random.default_rng(seed)
    poses = np.tile(np.eye(4), (num, 1, 1))
    for pose in poses:
        q, r = np.linalg.qr(rng.normal(size=(3, 3)))
        q = q * np.sign(np.diag(r))
        pose[:3, :3] = q if np.linalg.det(q) > 0 else -q
        pose[:3, 3] = rng.normal(size=3)
    return poses


def pixel(out, f, row, col, down=8):
    """The 6 values [o, d] of pixel (row, col), read back through the documented channel layout."""
    r, s = row % down, col % down
    channels = [c * down * down + r * down + s for c in range(6)]
    return out[0, channels, f, row // down, col // down]


def test_shape_dtype_and_size_checks():
    out = plucker_map(np.tile(np.eye(4), (3, 1, 1)), 32, 48, dtype=torch.bfloat16)
    assert out.shape == (1, 384, 3, 4, 6) and out.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="multiples of 8"):
        plucker_map(np.eye(4)[None], 20, 48)
    with pytest.raises(ValueError, match=r"\[F, 4, 4\]"):
        plucker_map(np.eye(4), 16, 16)


def test_channel_layout_matches_a_naive_per_pixel_loop():
    height, width = 16, 24
    poses = random_poses(2)
    k = Intrinsics(fx=20.0, fy=15.0, cx=11.0, cy=7.5)
    out = plucker_map(poses, height, width, k, dtype=torch.float64).numpy()
    for f in range(2):
        rot, t = poses[f, :3, :3], poses[f, :3, 3]
        for v in range(height):
            for u in range(width):
                ray = rot @ np.array([(u + 0.5 - k.cx) / k.fx, (v + 0.5 - k.cy) / k.fy, 1.0])
                expected = np.concatenate([t, ray / np.linalg.norm(ray)])
                for c in range(6):
                    got = out[0, c * 64 + (v % 8) * 8 + (u % 8), f, v // 8, u // 8]
                    assert got == pytest.approx(expected[c], abs=1e-12), (f, v, u, c)


def test_directions_are_unit_and_origins_are_the_translation():
    poses = random_poses(3, seed=1)
    out = plucker_map(torch.from_numpy(poses), 32, 40)
    per_pixel = torch.nn.functional.pixel_shuffle(out[0].permute(1, 0, 2, 3), 8)  # [F, 6, H, W]
    torch.testing.assert_close(per_pixel[:, 3:].norm(dim=1), torch.ones(3, 32, 40))
    expected = torch.from_numpy(poses[:, :3, 3]).float()[:, :, None, None].expand(3, 3, 32, 40)
    torch.testing.assert_close(per_pixel[:, :3], expected)


def test_identity_rays_are_centred_on_the_optical_axis():
    height, width = 16, 32
    out = plucker_map(np.eye(4)[None], height, width, dtype=torch.float64)
    # cx = W/2 falls between the two middle columns: their rays mirror each other about the z axis.
    centre = [pixel(out, 0, row, col)[3:] for row in (7, 8) for col in (15, 16)]
    mean = torch.stack(centre).mean(0)
    torch.testing.assert_close(mean / mean.norm(), torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    left, right = pixel(out, 0, 3, 0)[3:], pixel(out, 0, 3, width - 1)[3:]
    assert left[0] < 0 < right[0] and left[0] == pytest.approx(-right[0])
    # With the principal point on a pixel centre, that pixel looks straight down the axis.
    shifted = plucker_map(np.eye(4)[None], height, width, Intrinsics(500.0, 500.0, 16.5, 8.5), dtype=torch.float64)
    torch.testing.assert_close(pixel(shifted, 0, 8, 16)[3:], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    # Default intrinsics: the corner ray's slope is (0.5 - W/2) / 500.
    corner = pixel(out, 0, 0, 0)[3:]
    assert (corner[0] / corner[2]).item() == pytest.approx((0.5 - width / 2) / 500)


def test_rotated_camera_rotates_every_ray():
    cam = CameraTrajectory()
    cam.extend([[], ["l"]])
    out = plucker_map(cam.chunk_c2w(2), 16, 16, dtype=torch.float64)
    rot = torch.from_numpy(cam.poses[1][:3, :3])
    for row, col in [(0, 0), (5, 11), (15, 15)]:
        torch.testing.assert_close(pixel(out, 1, row, col)[3:], rot @ pixel(out, 0, row, col)[3:])
    # Yaw right by 6°: the axis ray leans towards +x.
    axis = plucker_map(cam.chunk_c2w(1), 16, 16, Intrinsics(500.0, 500.0, 8.5, 8.5), dtype=torch.float64)
    direction = pixel(axis, 0, 8, 8)[3:]
    assert math.degrees(math.atan2(direction[0], direction[2])) == pytest.approx(6.0)
