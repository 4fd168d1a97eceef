import itertools
import json
import pickle

import numpy as np
import pytest

from lingbot_ray.control.camera import CameraTrajectory
from lingbot_ray.world.dataset import (
    ACTION_KEYS,
    EVAL_SEED_START,
    MAX_PITCH_STEPS,
    ClipDataset,
    _clip_specs,
    decode_actions,
    encode_actions,
    generate_dataset,
    make_clip,
    random_actions,
)
from lingbot_ray.world.render import pixel_poses, render
from lingbot_ray.world.scene import World

SIZE = (48, 32)


def test_random_actions_are_held_key_runs_covering_every_key():
    rng = np.random.default_rng(0)
    counts = dict.fromkeys(ACTION_KEYS, 0)
    frames = runs = 0
    for _ in range(300):
        actions = random_actions(rng, 16)
        assert len(actions) == 16 and actions[0] == []
        assert all(set(keys) <= set(ACTION_KEYS) and len(keys) <= 2 for keys in actions)
        runs += 1 + sum(a != b for a, b in itertools.pairwise(actions[1:]))
        camera = CameraTrajectory()
        camera.extend(actions)
        assert abs(camera.pitch_deg) <= 4 * MAX_PITCH_STEPS
        frames += len(actions) - 1
        for keys in actions:
            for key in keys:
                counts[key] += 1
    assert frames / runs > 2.5  # held keys: runs of several frames, not a new set every frame
    assert all(count / frames > 0.07 for count in counts.values()), counts  # each key held in > 7% of frames
    assert random_actions(np.random.default_rng(1), 1) == [[]]


def test_action_masks_round_trip():
    actions = [[], ["w"], ["w", "j"], ["k"], ["s", "a", "d"]]
    masks = encode_actions(actions)
    assert masks.dtype == np.uint8
    assert decode_actions(masks) == [[], ["w"], ["w", "j"], ["k"], ["s", "a", "d"]]


def test_make_clip_renders_the_trajectory_of_its_actions():
    actions = [[], ["w"], ["l"], ["w", "a"]]
    clip = make_clip(11, actions, *SIZE)
    camera = CameraTrajectory()
    camera.extend(actions)
    np.testing.assert_array_equal(clip.latent_poses, camera.poses)
    assert clip.frames.shape == (1 + 4 * 3, SIZE[1], SIZE[0], 3) and clip.frames.dtype == np.uint8
    expected = render(World.from_seed(11), pixel_poses(camera.poses), None, *SIZE)
    np.testing.assert_array_equal(clip.frames, expected)
    assert clip.world_seed == 11 and clip.actions == actions


def test_dataset_round_trip_meta_and_byte_identical_regeneration(tmp_path):
    kwargs = {"num_clips": 5, "num_latent_frames": 3, "width": SIZE[0], "height": SIZE[1], "seed": 4}
    kwargs |= {"clips_per_shard": 2, "progress": False}
    meta = generate_dataset(tmp_path / "a", **kwargs)
    generate_dataset(tmp_path / "b", workers=2, **kwargs)  # parallel rendering writes the same bytes
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["meta.json", "shard_00000.npz", "shard_00001.npz", "shard_00002.npz"]
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name

    on_disk = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert on_disk == meta
    assert (meta["num_clips"], meta["num_latent_frames"], meta["num_pixel_frames"]) == (5, 3, 9)
    assert (meta["width"], meta["height"], meta["split"]) == (*SIZE, "train")
    assert [s["num_clips"] for s in meta["shards"]] == [2, 2, 1]
    assert meta["intrinsics"]["fx"] == pytest.approx(500 * SIZE[0] / 832)

    dataset = ClipDataset(tmp_path / "a")
    assert len(dataset) == 5
    specs = _clip_specs(5, 3, 4, "train", None)
    for i, spec in enumerate(specs):
        frames, actions, poses = dataset[i]
        assert isinstance(frames, np.memmap) and frames.shape == (9, SIZE[1], SIZE[0], 3)
        assert actions == [sorted(keys, key=ACTION_KEYS.index) for keys in spec.actions]
        assert dataset.world_seed(i) == spec.world_seed
        clip = make_clip(spec.world_seed, spec.actions, *SIZE)
        np.testing.assert_array_equal(frames, clip.frames)
        np.testing.assert_array_equal(poses, clip.latent_poses)
    np.testing.assert_array_equal(dataset[-1][0], dataset[4][0])
    with pytest.raises(IndexError):
        dataset[5]
    clone = pickle.loads(pickle.dumps(dataset))
    np.testing.assert_array_equal(clone[3][0], dataset[3][0])

    other = generate_dataset(tmp_path / "c", **{**kwargs, "seed": 5})
    assert other["seed"] == 5
    assert not np.array_equal(ClipDataset(tmp_path / "c").world_seeds, dataset.world_seeds)


def test_held_out_world_seeds_never_appear_in_training_data(tmp_path):
    train = [spec.world_seed for spec in _clip_specs(3000, 2, 0, "train", None)]
    assert max(train) < EVAL_SEED_START and len(set(train)) > 2900
    held_out = [spec.world_seed for spec in _clip_specs(300, 2, 0, "eval", None)]
    assert min(held_out) >= EVAL_SEED_START
    pooled = {spec.world_seed for spec in _clip_specs(400, 2, 0, "train", 7)}
    assert len(pooled) == 7 and max(pooled) < EVAL_SEED_START

    meta = generate_dataset(tmp_path / "eval", 3, 2, *SIZE, seed=0, split="eval", progress=False)
    assert meta["world_seed_range"][0] == EVAL_SEED_START
    assert (ClipDataset(tmp_path / "eval").world_seeds >= EVAL_SEED_START).all()
    with pytest.raises(ValueError):
        generate_dataset(tmp_path / "x", 1, 2, *SIZE, seed=0, split="validation", progress=False)


def test_a_dataset_written_with_other_action_keys_is_refused(tmp_path):
    generate_dataset(tmp_path, 1, 2, *SIZE, seed=0, progress=False)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["action_keys"] == ACTION_KEYS == "wsadikjl"  # the bits on disk (see tests/protocol/test_actions.py)
    meta["action_keys"] = "wasdijkl"
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="action_keys='wasdijkl'"):
        ClipDataset(tmp_path)
