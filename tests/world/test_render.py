import math

import numpy as np
import pytest

from lingbot_ray.control.camera import CameraTrajectory, Intrinsics
from lingbot_ray.world.render import (
    FLOOR_ID,
    SKY_ID,
    parse_actions,
    pixel_poses,
    ray_directions,
    render,
    render_buffers,
    trajectory_poses,
    world_intrinsics,
)
from lingbot_ray.world.scene import World

W, H = 96, 64


def poses_after(*actions):
    camera = CameraTrajectory()
    camera.extend([[], *actions])
    return camera.poses


def gray(image):
    return image.astype(np.float64).mean(axis=-1)


def best_shift(before, after, axis, max_shift=30):
    """Shift s (pixels along ``axis``) minimising the mean squared difference of after[x] and before[x − s]."""
    a, b = gray(before), gray(after)
    errors = {}
    for s in range(-max_shift, max_shift + 1):
        n = a.shape[axis]
        src = np.take(a, range(max(0, -s), min(n, n - s)), axis=axis)
        dst = np.take(b, range(max(0, s), min(n, n + s)), axis=axis)
        errors[s] = np.mean((src - dst) ** 2)
    return min(errors, key=errors.get)


def best_zoom(before, after, rows):
    """Zoom factor about the image centre that best maps ``before`` onto ``after`` within ``rows``."""
    a, b = gray(before), gray(after)
    h, w = a.shape
    v, u = np.mgrid[0:h, 0:w] + 0.5
    errors = {}
    for zoom in np.linspace(0.8, 1.25, 46):
        # after(p) = before(c + (p − c) / zoom), nearest neighbour
        su = np.clip(((u - w / 2) / zoom + w / 2).astype(int), 0, w - 1)
        sv = np.clip(((v - h / 2) / zoom + h / 2).astype(int), 0, h - 1)
        errors[zoom] = np.mean((a[sv, su] - b)[rows] ** 2)
    return min(errors, key=errors.get)


def test_world_intrinsics_keep_the_models_field_of_view():
    assert world_intrinsics(832, 480) == Intrinsics(500.0, 500.0, 416.0, 240.0)
    small = world_intrinsics(128, 80)
    assert small.fx == small.fy == pytest.approx(500 * 128 / 832)
    assert (small.cx, small.cy) == (64, 40)
    assert 2 * math.degrees(math.atan(small.cx / small.fx)) == pytest.approx(79.5, abs=0.5)


def test_pixel_poses_put_latent_pose_k_at_pixel_frame_4k_and_interpolate_between():
    latent = poses_after(["w", "l"], ["i"], ["d", "j"], [])
    pixel = pixel_poses(latent)
    assert pixel.shape == (1 + 4 * 4, 4, 4)
    for k in range(len(latent)):
        np.testing.assert_array_equal(pixel[4 * k], latent[k])
    for k in range(1, len(latent)):
        for j in range(1, 4):
            pose, a = pixel[4 * (k - 1) + j], j / 4
            np.testing.assert_allclose(pose[:3, 3], (1 - a) * latent[k - 1, :3, 3] + a * latent[k, :3, 3], atol=1e-12)
            np.testing.assert_allclose(pose[:3, :3] @ pose[:3, :3].T, np.eye(3), atol=1e-12)
            np.testing.assert_array_equal(pose[3], [0, 0, 0, 1])
    # Latent frame 1 yaws 6° right: a quarter of the way is 1.5°, with no pitch or roll.
    c, s = math.cos(math.radians(1.5)), math.sin(math.radians(1.5))
    np.testing.assert_allclose(pixel[1, :3, :3], [[c, 0, s], [0, 1, 0], [-s, 0, c]], atol=1e-12)
    # Latent frame 2 pitches 4° up: half way is 2° up on top of the 6° yaw.
    forward = pixel[6, :3, 2]
    assert math.degrees(math.asin(-forward[1])) == pytest.approx(2.0)
    assert math.degrees(math.atan2(forward[0], forward[2])) == pytest.approx(6.0)


def test_pixel_poses_of_one_latent_frame_and_rejects_roll():
    np.testing.assert_array_equal(pixel_poses(np.eye(4)[None]), np.eye(4)[None])
    rolled = np.stack([np.eye(4), np.eye(4)])
    rolled[1, :3, :3] = [[0, -1, 0], [1, 0, 0], [0, 0, 1]]
    with pytest.raises(ValueError, match="roll"):
        pixel_poses(rolled)


def test_parse_actions_prepends_frame_zero():
    assert parse_actions("w*2,wj,-*2,i+k") == [[], ["w"], ["w"], ["w", "j"], [], [], ["i", "k"]]
    np.testing.assert_array_equal(trajectory_poses(parse_actions("w*2"))[-1][:3, 3], [0, 0, 0.1])
    with pytest.raises(ValueError):
        parse_actions("q*2")


@pytest.mark.parametrize("seed", range(6))
def test_identity_view_shows_sky_above_floor_below_and_objects(seed):
    buffers = render_buffers(World.from_seed(seed), np.eye(4), None, W, H)
    ids, rgb = buffers.ids[0], buffers.rgb[0].astype(np.float64)
    assert (ids[0] == SKY_ID).mean() > 0.6
    assert (ids[-1] == FLOOR_ID).mean() > 0.3
    assert len(np.unique(ids[ids > FLOOR_ID])) >= 2  # several objects in view
    sky_colour = rgb[: H // 3][ids[: H // 3] == SKY_ID].mean(axis=0)
    floor_colour = rgb[-H // 3 :][ids[-H // 3 :] == FLOOR_ID].mean(axis=0)
    assert np.linalg.norm(sky_colour - floor_colour) > 60
    # The horizon of a level camera is the middle row: floor never shows above it, sky never below.
    assert not (ids[: H // 2] == FLOOR_ID).any() and not (ids[H // 2 :] == SKY_ID).any()
    visible = buffers.depth[0][ids > FLOOR_ID]
    assert visible.min() > 0.3 and np.median(visible) < 5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_yaw_right_moves_content_left_and_yaw_left_moves_it_right(seed):
    world = World.from_seed(seed)
    frames = render(world, np.stack([poses_after()[0], poses_after(["l"], ["l"])[-1], poses_after(["j"], ["j"])[-1]]), None, W, H)
    expected = world_intrinsics(W, H).fx * math.tan(math.radians(12))  # ≈ 12.3 px at the centre
    right, left = best_shift(frames[0], frames[1], axis=1), best_shift(frames[0], frames[2], axis=1)
    assert right == pytest.approx(-expected, abs=3)
    assert left == pytest.approx(expected, abs=3)
    assert best_shift(frames[0], frames[1], axis=0) == 0


@pytest.mark.parametrize("seed", [0, 3])
def test_pitch_up_moves_the_horizon_down(seed):
    world = World.from_seed(seed)
    intrinsics = world_intrinsics(W, H)
    for steps in (3, -2):
        pose = poses_after(*[["i" if steps > 0 else "k"]] * abs(steps))[-1]
        buffers = render_buffers(world, np.stack([np.eye(4), pose]), None, W, H)
        horizon = intrinsics.cy + intrinsics.fy * math.tan(math.radians(4 * steps))
        # The highest floor pixel in any column sits just below the horizon line.
        floor_rows = np.where((buffers.ids[1] == FLOOR_ID).any(axis=1))[0]
        assert floor_rows.min() == pytest.approx(horizon, abs=1.5)
        shift = best_shift(buffers.rgb[0], buffers.rgb[1], axis=0)
        assert shift == pytest.approx(horizon - intrinsics.cy, abs=2.5)


@pytest.mark.parametrize("seed", [0, 1, 4])
def test_moving_forward_zooms_in_and_backward_zooms_out(seed):
    world = World.from_seed(seed)
    frames = render(world, np.stack([np.eye(4), poses_after(*[["w"]] * 3)[-1], poses_after(*[["s"]] * 3)[-1]]), None, W, H)
    lower = slice(H // 2 + 2, H)  # floor and object bases: everything there is at a finite distance
    assert best_zoom(frames[0], frames[1], lower) > 1.04
    assert best_zoom(frames[0], frames[2], lower) < 0.97
    assert np.abs(gray(frames[1]) - gray(frames[0]))[lower].mean() > 5  # a chunk of w is a clearly visible change


def test_strafing_right_moves_near_content_left():
    frames = render(World.from_seed(2), np.stack([np.eye(4), poses_after(*[["d"]] * 3)[-1]]), None, W, H)
    lower = np.s_[H // 2 + 2 :]
    assert best_shift(frames[0][lower], frames[1][lower], axis=1) < -2


def test_rendering_is_deterministic_and_seeds_differ():
    poses = pixel_poses(poses_after(["w"], ["l"]))
    a = render(World.from_seed(7), poses, None, W, H)
    b = render(World.from_seed(7), poses, None, W, H)
    c = render(World.from_seed(8), poses, None, W, H)
    assert a.dtype == np.uint8 and a.shape == (9, H, W, 3)
    assert a.tobytes() == b.tobytes()
    assert np.abs(a.astype(int) - c).mean() > 20
    assert render(World.from_seed(7), poses[4], None, W, H).shape == (H, W, 3)


def test_supersampling_averages_sub_pixels_of_the_same_view():
    world = World.from_seed(5)
    plain = render(world, np.eye(4), None, W, H).astype(float)
    smooth = render(world, np.eye(4), None, W, H, supersample=2).astype(float)
    assert smooth.shape == plain.shape
    assert np.abs(smooth - plain).mean() < 12  # same picture, softer edges
    assert np.abs(np.diff(gray(smooth), axis=1)).mean() < np.abs(np.diff(gray(plain), axis=1)).mean()


def test_camera_inside_an_object_still_renders_a_closed_view():
    world = World.from_seed(0)
    lo, hi = world.object_bounds
    inside = np.eye(4)
    inside[:3, 3] = (lo[0] + hi[0]) / 2
    inside[1, 3] = 0.0 if lo[0, 1] < 0 else (lo[0, 1] + hi[0, 1]) / 2
    buffers = render_buffers(world, inside, None, 32, 24)
    assert np.isfinite(buffers.depth).all()
    assert not (buffers.ids == SKY_ID).any()


def test_ray_directions_are_the_plucker_direction_channels():
    torch = pytest.importorskip("torch")
    from lingbot_ray.engine.plucker import plucker_map

    poses = pixel_poses(poses_after(["w", "l"], ["i", "d"], ["j"]))[[0, 3, 8, 12]]
    intrinsics = world_intrinsics(W, H)
    planes = plucker_map(poses, H, W, intrinsics, dtype=torch.float64, downscale=1)[0]  # [6, F, H, W]
    world = World.from_seed(1)
    buffers = render_buffers(world, poses, intrinsics, W, H)
    for f, pose in enumerate(poses):
        dirs = planes[3:, f].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(ray_directions(pose, intrinsics, W, H), dirs, atol=1e-5)
        np.testing.assert_allclose(planes[:3, f].permute(1, 2, 0).numpy(), np.broadcast_to(pose[:3, 3], (H, W, 3)), atol=1e-6)
        # The renderer's hits lie along those rays: floor pixels reach exactly the floor plane.
        floor = buffers.ids[f] == FLOOR_ID
        points = pose[:3, 3] + buffers.depth[f][floor][:, None] * dirs[floor]
        np.testing.assert_allclose(points[:, 1], world.eye_height, atol=1e-4 * np.abs(points).max())
