import dataclasses

import numpy as np
import pytest

from lingbot_ray.engine.session import ModelGeometry, SessionSpec

# LingBot World fast's geometry (docs/MODEL.md): 8x VAE, 4x in time, patch (1,2,2), blocks of 3, sink 9,
# window 18, 1024 RoPE positions.
GEOMETRY = ModelGeometry(
    vae_scale_spatial=8,
    vae_scale_temporal=4,
    latent_channels=16,
    patch_size=(1, 2, 2),
    num_frames_per_block=3,
    default_sink_size=9,
    default_window_frames=18,
    rope_max_seq_len=1024,
)


def spec(**changes):
    width = changes.pop("width", 64)
    height = changes.pop("height", 32)
    image = changes.pop("image", np.zeros((height, width, 3), np.uint8))
    return SessionSpec(prompt="a street", image=image, width=width, height=height, **changes)


def test_defaults_resolve_from_the_model():
    resolved = spec().resolve(GEOMETRY)
    assert (resolved.sink_size, resolved.window_frames) == (9, 18)
    assert resolved.blocks_per_chunk == 1
    assert resolved.latent_frames_per_chunk == 3
    assert (resolved.latent_height, resolved.latent_width) == (4, 8)
    assert GEOMETRY.tokens_per_frame(832, 480) == 1560
    assert GEOMETRY.tokens_per_frame(1280, 720) == 3600


@pytest.mark.parametrize(
    "num_frames, blocks", [(1, 1), (9, 1), (12, 1), (13, 2), (21, 2), (24, 2), (25, 3), (36, 3)]
)
def test_num_frames_rounds_up_to_whole_blocks(num_frames, blocks):
    assert spec(num_frames=num_frames).resolve(GEOMETRY).blocks_per_chunk == blocks


def test_pixel_frames_per_chunk():
    assert GEOMETRY.pixel_frames(3, first=True) == 9
    assert GEOMETRY.pixel_frames(3, first=False) == 12
    assert GEOMETRY.pixel_frames(6, first=True) == 21
    assert GEOMETRY.pixel_frames(6, first=False) == 24


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(prompt="  "), "prompt"),
        (dict(num_frames=0), "num_frames"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(seed=-1), "seed"),
        (dict(seed=1.5), "seed"),
        (dict(guidance_scale=float("nan")), "guidance_scale"),
        (dict(guidance_scale=-1.0), "guidance_scale"),
        (dict(sink_size=-1), "sink_size"),
        (dict(window_frames=0), "window_frames"),
        (dict(quality="medium"), "quality"),
        (dict(negative_prompt=3), "negative_prompt"),
        (dict(image=np.zeros((32, 64, 3), np.float32)), "image"),
        (dict(image=np.zeros((32, 48, 3), np.uint8)), "image"),
        (dict(image=None), "image"),
    ],
)
def test_bad_fields_raise_value_error_naming_them(changes, field):
    if "prompt" in changes:
        with pytest.raises(ValueError, match=field):
            dataclasses.replace(spec(), **changes)
        return
    with pytest.raises(ValueError, match=field):
        spec(**changes)


def test_size_must_be_a_multiple_of_vae_times_patch():
    with pytest.raises(ValueError, match=r"width=72: must be a multiple of 16"):
        spec(width=72).resolve(GEOMETRY)
    with pytest.raises(ValueError, match=r"height=40: must be a multiple of 16"):
        spec(height=40).resolve(GEOMETRY)


def test_window_must_hold_sink_plus_one_block():
    with pytest.raises(ValueError, match=r"window_frames=11.*sink_size \(9\).*= 12"):
        spec(window_frames=11).resolve(GEOMETRY)
    with pytest.raises(ValueError, match=r"window_frames=18.*sink_size \(16\)"):
        spec(sink_size=16).resolve(GEOMETRY)
    resolved = spec(sink_size=3, window_frames=6).resolve(GEOMETRY)
    assert (resolved.sink_size, resolved.window_frames) == (3, 6)


def test_guidance_above_one_turns_on_cfg():
    assert not spec().use_cfg
    assert not spec(guidance_scale=1).use_cfg
    assert spec(guidance_scale=3.0).use_cfg
