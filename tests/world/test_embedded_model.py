"""The trained world model that ships as the default: small enough for the repository, loadable by the
real classes, and its video follows the keys on a world it never saw."""

import json

import numpy as np
import pytest

from lingbot_ray.client.compare import psnr
from lingbot_ray.checkpoint import checkpoint_folder
from lingbot_ray.world import quality
from lingbot_ray.world.dataset import EVAL_SEED_START, make_clip

FOLDER = checkpoint_folder("embedded:lingbot-world-tiny")


def test_it_fits_in_the_repository():
    size = sum(p.stat().st_size for p in FOLDER.rglob("*") if p.is_file())
    assert size <= 30 * 2**20, f"{size / 2**20:.1f} MB"


def test_it_loads_with_the_real_classes_at_the_world_geometry():
    from lingbot_ray.engine import RealtimeEngine
    from lingbot_ray.models.transformer_lingbot import CausalLingBotWorldTransformer3DModel
    from lingbot_ray.world.train_dit import camera_intrinsics

    index = json.loads((FOLDER / "model_index.json").read_text())
    assert index["transformer"][1] == CausalLingBotWorldTransformer3DModel.__name__ and index["vae"][1] == "AutoencoderKLWan"
    engine = RealtimeEngine.from_pretrained(FOLDER)
    assert (engine.defaults.width, engine.defaults.height) == (160, 96)
    assert engine.dit.intrinsics(160, 96).fx == pytest.approx(camera_intrinsics(160, 96).fx)  # the camera input it was trained on


@pytest.fixture(scope="module")
def engine():
    from lingbot_ray.engine import RealtimeEngine

    return RealtimeEngine.from_pretrained(FOLDER)


def test_it_follows_a_walk_better_than_a_still_image_on_an_unseen_world(engine):
    world = EVAL_SEED_START + 5  # not among the quality script's worlds either
    script = [[]] + [["w"]] * 5 + [["l"]] * 6
    truth = make_clip(world, script, 160, 96).frames
    generated = quality.generate(engine, truth[0], script, 4, seed=0)
    model = np.mean([psnr(generated[f], truth[f]) for f in range(9, 45)])
    still = np.mean([psnr(truth[0], truth[f]) for f in range(9, 45)])
    assert model > still + 1.0, (model, still)


def test_the_keys_steer_the_video(engine):
    first = make_clip(EVAL_SEED_START + 5, [[]], 160, 96).frames[0]
    chunks = {key: quality.generate(engine, first, [[]] * 3 + [[key]] * 3, 2, seed=0)[9:].astype(np.float32) for key in "wjl"}
    turn = np.mean((chunks["j"] - chunks["l"]) ** 2)
    assert turn > 4 * np.mean((chunks["w"] - quality.generate(engine, first, [[]] * 3 + [["w"]] * 3, 2, seed=1)[9:]) ** 2)


def test_its_camera_path_keeps_the_residual_stream_in_scale(engine):
    """Every block applies ``x = (1 + scale)·x + shift`` from the camera; the final norm hides the
    stream's magnitude from the loss, and a recipe that let the scales run (camera layers at 5× the
    learning rate) shipped a model with mean |1 + scale| of 125-1,945 per block (max 6,783), whose
    8-layer successors overflowed float32. The shipped model's are near 1."""
    import torch

    from lingbot_ray.control.camera import CameraTrajectory
    from lingbot_ray.engine.plucker import plucker_map

    trajectory = CameraTrajectory()
    for keys in (["w"], ["w", "l"], ["a", "i"]):
        trajectory.advance(keys)
    plucker = plucker_map(trajectory.chunk_c2w(3), 96, 160, engine.dit.intrinsics(160, 96))
    with torch.no_grad():
        cache = engine.dit.model.build_camera_cache(plucker)
    assert len(cache.scales) == engine.dit.model.config.num_layers
    for block, scale in enumerate(cache.scales):
        gain = (1 + scale).abs()
        assert float(gain.mean()) < 4 and float(gain.max()) < 10, (block, float(gain.mean()), float(gain.max()))
