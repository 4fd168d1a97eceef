"""Streaming Wan VAE: streamed decode == diffusers' one-shot decode; condition latents == one-shot encode."""

import logging

import pytest
import torch

from lingbot_ray.models.tiny_components import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD, build_tiny_vae
from lingbot_ray.models.vae_streaming import ConditionLatents, DecodeCache, StreamingWanVAE

LATENT_HW = (4, 6)
PIXEL_HW = (32, 48)
CHUNK = 3  # latent frames per chunk, as the DiT produces them
NUM_CHUNKS = 4


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    build_tiny_vae(root / "vae", base_dim=8, seed=0)
    return root


@pytest.fixture(scope="module")
def streaming(vae_folder):
    return StreamingWanVAE.from_pretrained(vae_folder)


def _latents(seed, frames=CHUNK * NUM_CHUNKS, batch=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 16, frames, *LATENT_HW, generator=g)


def _denormalise(latents):
    mean = torch.tensor(WAN21_LATENTS_MEAN).view(1, -1, 1, 1, 1)
    std = torch.tensor(WAN21_LATENTS_STD).view(1, -1, 1, 1, 1)
    return latents * std + mean


def _normalise(latents):
    mean = torch.tensor(WAN21_LATENTS_MEAN).view(1, -1, 1, 1, 1)
    std = torch.tensor(WAN21_LATENTS_STD).view(1, -1, 1, 1, 1)
    return (latents - mean) / std


def _one_shot_decode(streaming, latents):
    with torch.no_grad():
        return streaming.vae.decode(_denormalise(latents)).sample


def _stream(streaming, latents, cache=None):
    cache = cache or streaming.new_decode_cache()
    pieces = []
    for start in range(0, latents.shape[2], CHUNK):
        frames, cache = streaming.decode_chunk(latents[:, :, start : start + CHUNK], cache)
        pieces.append(frames)
    return pieces, cache


# ------------------------------------------------------------------------------------------ builder


def test_tiny_vae_is_seeded_and_keeps_the_real_latent_space(tmp_path):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = build_tiny_vae(tmp_path / "a", seed=0)
    assert torch.equal(torch.rand(1), expected_next)  # the caller's RNG is untouched
    second = build_tiny_vae(tmp_path / "b", seed=0)
    third = build_tiny_vae(tmp_path / "c", seed=1)
    weights = [m.state_dict()["decoder.conv_in.weight"] for m in (first, second, third)]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])
    assert first.config.z_dim == 16 and list(first.config.temperal_downsample) == [False, True, True]
    assert list(first.config.latents_mean) == WAN21_LATENTS_MEAN
    assert list(first.config.latents_std) == WAN21_LATENTS_STD


# ------------------------------------------------------------------------------------------ decode


def test_streamed_decode_equals_one_shot_decode(streaming):
    latents = _latents(seed=1)
    reference = _one_shot_decode(streaming, latents)
    # Random weights must give a non-trivial video, else equality would prove nothing.
    assert reference.std() > 0.1 and (reference.abs() < 0.99).float().mean() > 0.5

    pieces, cache = _stream(streaming, latents)

    assert [p.shape[2] for p in pieces] == [1 + 4 * (CHUNK - 1)] + [4 * CHUNK] * (NUM_CHUNKS - 1)
    assert pieces[0].shape[-2:] == PIXEL_HW
    torch.testing.assert_close(torch.cat(pieces, dim=2), reference, rtol=1e-5, atol=1e-5)
    assert cache.num_latent_frames == CHUNK * NUM_CHUNKS
    assert cache.num_pixel_frames == reference.shape[2]


def test_single_frame_chunks_match_too(streaming):
    latents = _latents(seed=2, frames=5)
    cache = streaming.new_decode_cache()
    pieces = []
    for i in range(5):
        frames, cache = streaming.decode_chunk(latents[:, :, i : i + 1], cache)
        pieces.append(frames)
    assert [p.shape[2] for p in pieces] == [1, 4, 4, 4, 4]
    torch.testing.assert_close(torch.cat(pieces, dim=2), _one_shot_decode(streaming, latents), rtol=1e-5, atol=1e-5)


def test_interleaved_sessions_keep_separate_state(streaming):
    latents_a, latents_b = _latents(seed=3), _latents(seed=4)
    alone_a, _ = _stream(streaming, latents_a)
    alone_b, _ = _stream(streaming, latents_b)

    cache_a, cache_b = streaming.new_decode_cache(), streaming.new_decode_cache()
    for i, start in enumerate(range(0, latents_a.shape[2], CHUNK)):
        frames_a, cache_a = streaming.decode_chunk(latents_a[:, :, start : start + CHUNK], cache_a)
        frames_b, cache_b = streaming.decode_chunk(latents_b[:, :, start : start + CHUNK], cache_b)
        torch.testing.assert_close(frames_a, alone_a[i], rtol=0, atol=0)
        torch.testing.assert_close(frames_b, alone_b[i], rtol=0, atol=0)
    assert not torch.equal(alone_a[1], alone_b[1])


def test_reset_starts_a_new_video(streaming):
    latents = _latents(seed=5, frames=2 * CHUNK)
    first, cache = _stream(streaming, latents)
    cache.reset()
    again, cache = _stream(streaming, latents, cache)
    assert again[0].shape[2] == 1 + 4 * (CHUNK - 1)
    torch.testing.assert_close(torch.cat(again, 2), torch.cat(first, 2), rtol=0, atol=0)


def test_batched_decode_matches_per_sample(streaming):
    latents = _latents(seed=6, frames=2 * CHUNK, batch=2)
    batched = torch.cat(_stream(streaming, latents)[0], dim=2)
    single = torch.cat(_stream(streaming, latents[1:])[0], dim=2)
    torch.testing.assert_close(batched[1:], single, rtol=1e-5, atol=1e-5)


def test_bfloat16_streamed_decode_matches_bfloat16_one_shot(vae_folder):
    streaming = StreamingWanVAE.from_pretrained(vae_folder, dtype=torch.bfloat16)
    assert streaming.dtype == torch.bfloat16
    latents = _latents(seed=7, frames=2 * CHUNK)
    pieces, _ = _stream(streaming, latents)
    with torch.no_grad():
        reference = streaming.vae.decode(_denormalise(latents).to(torch.bfloat16)).sample
    assert pieces[0].dtype == torch.bfloat16
    torch.testing.assert_close(torch.cat(pieces, 2).float(), reference.float(), rtol=0, atol=2e-2)


def test_decode_rejects_bad_input(streaming, vae_folder):
    cache = streaming.new_decode_cache()
    with pytest.raises(ValueError, match="16 channels"):
        streaming.decode_chunk(torch.zeros(1, 4, 1, *LATENT_HW), cache)
    with pytest.raises(ValueError, match=r"\[B, 16, F, h, w\]"):
        streaming.decode_chunk(torch.zeros(16, 1, *LATENT_HW), cache)
    streaming.decode_chunk(torch.zeros(1, 16, 1, *LATENT_HW), cache)
    with pytest.raises(ValueError, match=r"\(1, 8, 8\)"):
        streaming.decode_chunk(torch.zeros(1, 16, 1, 8, 8), cache)
    other = StreamingWanVAE.from_pretrained(vae_folder)
    with pytest.raises(ValueError, match="another StreamingWanVAE"):
        other.decode_chunk(torch.zeros(1, 16, 1, *LATENT_HW), cache)
    assert cache.num_latent_frames == 1  # rejected chunks leave the session untouched


def test_state_lives_in_the_cache_not_the_module(streaming):
    cache = streaming.new_decode_cache()
    assert isinstance(cache, DecodeCache) and all(slot is None for slot in cache.feat_map)
    _, cache = streaming.decode_chunk(_latents(seed=8, frames=1), cache)
    assert any(isinstance(slot, torch.Tensor) for slot in cache.feat_map)
    # diffusers' own per-module cache stays empty: decode_chunk never uses it.
    assert getattr(streaming.vae, "_feat_map", None) is None or all(s is None for s in streaming.vae._feat_map)


# --------------------------------------------------------------------------------------- condition


def _image(seed, batch=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, *PIXEL_HW, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def condition(streaming):
    return streaming.encode_condition(_image(seed=10))


def test_condition_reaches_fixed_point_and_logs_it(streaming, caplog):
    with caplog.at_level(logging.INFO, logger="lingbot_ray.models.vae_streaming"):
        cond = streaming.encode_condition(_image(seed=11))
    assert isinstance(cond, ConditionLatents)
    assert 2 < cond.num_encoded_frames < streaming.max_condition_frames
    assert f"after {cond.num_encoded_frames} latent frames" in caplog.text


def test_condition_mask_is_one_on_frame_zero_only(condition):
    block = condition.slice(0, 6)
    assert block.shape == (1, 4 + 16, 6, *LATENT_HW)
    assert torch.all(block[:, :4, 0] == 1)
    assert torch.all(block[:, :4, 1:] == 0)
    assert torch.all(condition.slice(3, 3)[:, :4] == 0)


def test_condition_equals_one_shot_encode_of_image_then_zero_frames(streaming, condition):
    image = _image(seed=10)
    frames = condition.num_encoded_frames + 2  # reach past the fixed point
    video = torch.cat([image.unsqueeze(2), torch.zeros(1, 3, 4 * (frames - 1), *PIXEL_HW)], dim=2)
    with torch.no_grad():
        reference = _normalise(streaming.vae.encode(video).latent_dist.mode())
    assert reference.shape[2] == frames

    streamed = condition.slice(0, frames)[:, 4:]
    torch.testing.assert_close(streamed, reference, rtol=1e-5, atol=1e-5)
    # The image must matter, else this would be a comparison of constants.
    assert not torch.allclose(reference[:, :, 0], reference[:, :, -1], atol=1e-3)


def test_condition_tail_is_constant_and_slices_are_consistent(condition):
    k = condition.num_encoded_frames
    tail = condition.slice(k - 1, 1)
    far = condition.slice(k + 100, 7)
    assert torch.equal(far, tail.expand_as(far))

    whole = condition.slice(0, k + 5)
    for start, count in [(0, 3), (3, 3), (k - 2, 3), (k - 1, 4), (k + 2, 3)]:
        assert torch.equal(condition.slice(start, count), whole[:, :, start : start + count])


def test_condition_batch_matches_per_image(streaming):
    images = torch.cat([_image(seed=12), _image(seed=13)])
    batched = streaming.encode_condition(images)
    single = streaming.encode_condition(images[1:])
    frames = max(batched.num_encoded_frames, single.num_encoded_frames)
    torch.testing.assert_close(batched.slice(0, frames)[1:], single.slice(0, frames), rtol=1e-5, atol=1e-5)


def test_fixed_point_search_is_bounded(vae_folder):
    streaming = StreamingWanVAE.from_pretrained(vae_folder, max_condition_frames=3)
    with pytest.raises(RuntimeError, match="max_condition_frames=3"):
        streaming.encode_condition(_image(seed=14))


def test_condition_rejects_bad_input(streaming, condition):
    with pytest.raises(ValueError, match="multiple of 8"):
        streaming.encode_condition(torch.zeros(1, 3, 30, 48))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        streaming.encode_condition(torch.zeros(3, *PIXEL_HW))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        streaming.encode_condition(torch.full((1, 3, *PIXEL_HW), 255.0))
    with pytest.raises(ValueError, match="start_frame"):
        condition.slice(-1, 3)
    with pytest.raises(ValueError, match="num_frames"):
        condition.slice(0, 0)
