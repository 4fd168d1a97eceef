import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lingbot_ray.control import CameraTrajectory, Intrinsics

S6, C6 = math.sin(math.radians(6)), math.cos(math.radians(6))
S4, C4 = math.sin(math.radians(4)), math.cos(math.radians(4))


def trajectory(*frames, **kwargs):
    cam = CameraTrajectory(**kwargs)
    cam.extend(frames)
    return cam


# Reference behaviour (SGLang-diffusion's LingBot World pipeline config, lingbot_world.py: it
# integrates the session's whole action history from identity, one pose per latent frame *after*
# that frame's keys, latent frame 0's included, then conditions relative to frame 0's pose with
# framewise deltas normalised by the largest delta translation). Vectors below were derived from
# that rule for the scripts shown; rows are [R | t] of each conditioning pose. The reference also
# adds 1e-6 to the norm of the horizontal heading, which moves these by less than 1e-8.
REF_FIRST_PITCH_BLOCK_0 = [  # script [i], [l], [w]
    [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]],
    [
        [0.994521895, 0.007291537, 0.104273837, 0],
        [-0.007291537, 0.999973344, -0.000381202, 0],
        [-0.104273837, -0.000381202, 0.994548552, 0],
    ],
    [[1, 0, 0, 0], [0, 1, 0, 0.069756474], [0, 0, 1, 0.997564050]],
]
REF_FIRST_PITCH_BLOCK_1 = [  # then [l], [w], [i, w]
    [
        [0.994521895, 0.007291537, 0.104273837, 0],
        [-0.007291537, 0.999973344, -0.000381202, 0],
        [-0.104273837, -0.000381202, 0.994548552, 0],
    ],
    [[1, 0, 0, 0], [0, 1, 0, 0.069756474], [0, 0, 1, 0.997564050]],
    [[1, 0, 0, 0], [0, 0.997564050, -0.069756474, 0.069756474], [0, 0.069756474, 0.997564050, 0.997564050]],
]


def test_first_latent_frames_actions_move_the_start_as_the_reference_does():
    cam = trajectory(["i"], ["l"], ["w"])
    assert cam.pitch_deg == pytest.approx(4.0)  # frame 0's "i" counts
    np.testing.assert_allclose(cam.chunk_c2w(3)[:, :3], REF_FIRST_PITCH_BLOCK_0, atol=1e-6)
    cam.extend([["l"], ["w"], ["i", "w"]])
    np.testing.assert_allclose(cam.chunk_c2w(3)[:, :3], REF_FIRST_PITCH_BLOCK_1, atol=1e-6)
    # Holding "i" from frame 0: the reference reaches 84° after 21 frames and skips the 22nd step.
    held = trajectory(*[["i"]] * 21)
    assert held.pitch_deg == pytest.approx(84.0)
    held.advance(["i"])
    assert held.pitch_deg == pytest.approx(84.0)


def test_a_first_move_or_yaw_cancels_in_the_conditioning():
    """Conditioning is relative to frame 0's pose: only a first pitch changes what the model sees."""
    moved = trajectory(["w", "l"], ["w"], ["j"])
    np.testing.assert_allclose(moved.poses[0][:3, 3], [0.05 * S6, 0, 0.05 * C6], atol=1e-12)
    np.testing.assert_allclose(moved.chunk_c2w(3), trajectory([], ["w"], ["j"]).chunk_c2w(3), atol=1e-12)


def test_forward_then_yaw_right_then_forward():
    cam = trajectory([], ["w"], ["l"], ["w"])
    poses = cam.poses
    np.testing.assert_allclose(poses[1][:3, 3], [0, 0, 0.05], atol=1e-12)
    yaw = np.array([[C6, 0, S6], [0, 1, 0], [-S6, 0, C6]])
    np.testing.assert_allclose(poses[2][:3, :3], yaw, atol=1e-12)
    np.testing.assert_allclose(poses[2][:3, 3], [0, 0, 0.05], atol=1e-12)
    # "l" turns the view towards +x (right in OpenCV axes), so the next "w" moves that way.
    np.testing.assert_allclose(poses[3][:3, 3], [0.05 * S6, 0, 0.05 + 0.05 * C6], atol=1e-12)


def test_strafe_after_a_yaw_follows_the_new_right_vector():
    cam = trajectory([], ["l"], ["d"], ["a"], ["a"])
    poses = cam.poses
    np.testing.assert_allclose(poses[2][:3, 3], [0.05 * C6, 0, -0.05 * S6], atol=1e-12)
    np.testing.assert_allclose(poses[3][:3, 3], [0, 0, 0], atol=1e-12)
    np.testing.assert_allclose(poses[4][:3, 3], [-0.05 * C6, 0, 0.05 * S6], atol=1e-12)


def test_yaw_left_and_opposite_keys_cancel():
    cam = trajectory([], ["j"], ["w", "s", "i", "k", "a", "d"])
    np.testing.assert_allclose(cam.poses[1][:3, :3], [[C6, 0, -S6], [0, 1, 0], [S6, 0, C6]], atol=1e-12)
    np.testing.assert_allclose(cam.poses[2], cam.poses[1], atol=1e-12)


def test_pitch_up_looks_up_and_forward_stays_horizontal():
    cam = trajectory([], ["i"], ["w"])
    rot = cam.poses[1][:3, :3]
    np.testing.assert_allclose(rot, [[1, 0, 0], [0, C4, -S4], [0, S4, C4]], atol=1e-12)
    assert rot[1, 2] < 0  # the optical axis points to -y, which is up in OpenCV axes
    np.testing.assert_allclose(cam.poses[2][:3, 3], [0, 0, 0.05], atol=1e-12)


def test_pitch_steps_that_would_pass_85_degrees_are_skipped():
    cam = trajectory([], *[["i"]] * 21)
    assert cam.pitch_deg == pytest.approx(84)
    cam.advance(["i"])  # 88 > 85: skipped, not clipped to 85
    assert cam.pitch_deg == pytest.approx(84)
    np.testing.assert_allclose(cam.poses[-1], cam.poses[-2], atol=1e-12)
    cam.advance(["k"])
    assert cam.pitch_deg == pytest.approx(80)
    down = trajectory([], *[["k"]] * 30)
    assert down.pitch_deg == pytest.approx(-84)
    expected = np.array([[1, 0, 0], [0, math.cos(math.radians(-84)), math.sin(math.radians(84))], [0, 0, 0]])
    np.testing.assert_allclose(down.poses[-1][:2, :3], expected[:2], atol=1e-12)


def test_yaw_and_pitch_with_a_skipped_pitch_still_yaws():
    cam = CameraTrajectory(pitch_limit_deg=3.0)
    cam.extend([[], ["i", "l"]])
    assert cam.pitch_deg == 0.0
    np.testing.assert_allclose(cam.poses[1][:3, :3], [[C6, 0, S6], [0, 1, 0], [-S6, 0, C6]], atol=1e-12)


def test_step_sizes_are_parameters():
    cam = trajectory([], ["w"], ["l"], move_step=1.0, yaw_step_deg=90.0)
    np.testing.assert_allclose(cam.poses[1][:3, 3], [0, 0, 1], atol=1e-12)
    np.testing.assert_allclose(cam.poses[2][:3, 2], [1, 0, 0], atol=1e-12)
    with pytest.raises(ValueError, match="pitch_limit_deg"):
        CameraTrajectory(pitch_limit_deg=90)


def test_chunk_poses_are_normalised_frame_to_frame_deltas():
    cam = trajectory([], ["w"], ["l"], ["w"])
    out = cam.chunk_c2w(4)
    assert out.shape == (4, 4, 4) and out.dtype == np.float64
    np.testing.assert_allclose(out[0], np.eye(4), atol=1e-12)
    step = np.eye(4)
    step[2, 3] = 1.0  # 0.05 forward, divided by the largest delta norm 0.05
    np.testing.assert_allclose(out[1], step, atol=1e-12)
    turn = np.eye(4)
    turn[:3, :3] = [[C6, 0, S6], [0, 1, 0], [-S6, 0, C6]]
    np.testing.assert_allclose(out[2], turn, atol=1e-12)
    np.testing.assert_allclose(out[3], step, atol=1e-12)  # "w" after the turn is forward in its own frame
    np.testing.assert_allclose(cam.chunk_c2w(2), out[2:], atol=1e-12)


def test_relative_to_first_option_normalises_by_the_farthest_position():
    cam = trajectory([], ["w"], ["l"], ["w"], framewise=False)
    out = cam.chunk_c2w(3)
    farthest = 0.05 * math.sqrt(2 + 2 * C6)
    np.testing.assert_allclose(out[0][:3, 3], [0, 0, 0.05 / farthest], atol=1e-12)
    np.testing.assert_allclose(out[2][:3, 3], [0.05 * S6 / farthest, 0, (0.05 + 0.05 * C6) / farthest], atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(out[2][:3, 3]), 1.0)
    np.testing.assert_allclose(out[2][:3, :3], cam.poses[3][:3, :3], atol=1e-12)


def test_normalisation_uses_the_whole_history_not_just_the_chunk():
    cam = trajectory([], ["w", "d"], ["w"], ["l"])
    last = cam.chunk_c2w(2)
    np.testing.assert_allclose(np.linalg.norm(last[0][:3, 3]), 1 / math.sqrt(2), atol=1e-12)


def test_no_motion_leaves_translations_unscaled():
    cam = trajectory([], ["l"], ["i"])
    out = cam.chunk_c2w(3)
    assert np.all(np.isfinite(out)) and np.allclose(out[:, :3, 3], 0)


def test_chunk_size_is_checked():
    cam = trajectory([], [])
    with pytest.raises(ValueError, match="num_frames 3"):
        cam.chunk_c2w(3)
    with pytest.raises(ValueError, match="num_frames 0"):
        cam.chunk_c2w(0)


def test_default_intrinsics():
    assert Intrinsics.default(832, 480) == Intrinsics(fx=500.0, fy=500.0, cx=416.0, cy=240.0)
    assert Intrinsics.default(64, 32, focal=40.0).fx == 40.0
    with pytest.raises(ValueError, match="fx"):
        Intrinsics(0.0, 1.0, 0.0, 0.0)


def test_intrinsics_for_a_frame_size_reference_server_and_authors():
    # Reference server (SGLang-diffusion's LingBot World pipeline config): 500 px at every size.
    assert Intrinsics.for_frame(1280, 720) == Intrinsics(500.0, 500.0, 640.0, 360.0)
    # The authors' script (robbyant lingbot-world, get_Ks_transformed): intrinsics given at
    # 832x480 are resized per axis, so 500 px becomes 769.2 x 750 at 1280x720.
    authors = Intrinsics.for_frame(1280, 720, (500.0, 832, 480))
    assert (authors.fx, authors.fy, authors.cx, authors.cy) == pytest.approx((500 * 1280 / 832, 750.0, 640.0, 360.0))
    assert Intrinsics.for_frame(832, 480, (500.0, 832, 480)) == Intrinsics.for_frame(832, 480)


def _reference_chunk(poses, num_frames, framewise):
    """Straight from the definition, with general matrix inverses over the whole history."""
    rel = np.stack([np.linalg.inv(poses[0]) @ p for p in poses])
    rel[0] = np.eye(4)
    if framewise:
        rel = np.stack([np.eye(4)] + [np.linalg.inv(a) @ b for a, b in zip(rel[:-1], rel[1:])])
    scale = np.linalg.norm(rel[:, :3, 3], axis=-1).max()
    if scale > 1e-12:  # below: rounding residue of the general inverses, not a move
        rel[:, :3, 3] /= scale
    return rel[-num_frames:]


frames = st.lists(st.lists(st.sampled_from("wsadikjl"), max_size=3), min_size=1, max_size=60)


@settings(max_examples=60, deadline=None)
@given(frames, st.booleans(), st.integers(1, 8))
def test_random_actions_keep_a_valid_rotation_and_match_the_definition(actions, framewise, chunk):
    cam = trajectory(*actions, framewise=framewise)
    poses = cam.poses
    rot = poses[:, :3, :3]
    np.testing.assert_allclose(rot @ np.swapaxes(rot, 1, 2), np.broadcast_to(np.eye(3), rot.shape), atol=1e-9)
    np.testing.assert_allclose(np.linalg.det(rot), 1.0, atol=1e-9)
    # No roll: the camera's x axis stays horizontal, and pitch read back from R matches the tracker.
    np.testing.assert_allclose(rot[:, 1, 0], 0.0, atol=1e-9)
    assert abs(cam.pitch_deg) <= 85 + 1e-9
    np.testing.assert_allclose(math.degrees(math.asin(-rot[-1, 1, 2])), cam.pitch_deg, atol=1e-6)
    np.testing.assert_allclose(poses[:, 1, 3], 0.0, atol=1e-12)  # moves stay in the x-z plane

    chunk = min(chunk, len(actions))
    np.testing.assert_allclose(cam.chunk_c2w(chunk), _reference_chunk(poses, chunk, framewise), atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.lists(st.sampled_from("wsadijkl"), max_size=3), min_size=30, max_size=60),
    st.booleans(),
    st.integers(min_value=1, max_value=3),
)
def test_bounded_history_gives_the_same_chunk_poses_as_the_whole_history(actions, framewise, block):
    """A served session keeps only the poses a chunk needs (its state must not grow with its
    length), and conditions exactly as if it kept them all."""
    whole = CameraTrajectory(framewise=framewise)
    bounded = CameraTrajectory(framewise=framewise, max_history=block + 1)
    for start in range(0, len(actions) - block + 1, block):
        for frame in actions[start : start + block]:
            whole.advance(frame)
            bounded.advance(frame)
        np.testing.assert_array_equal(bounded.chunk_c2w(block), whole.chunk_c2w(block))
    assert bounded.num_frames == whole.num_frames
    assert len(bounded.poses) == block + 1 < len(whole.poses)
    with pytest.raises(ValueError, match="max_history"):
        bounded.chunk_c2w(block + 2)
