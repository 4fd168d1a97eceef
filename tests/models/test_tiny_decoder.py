"""Tiny (TAEHV-style) decoder: the published taew2_1 layout loads strictly, the project's folder format
round-trips, and the streamed decode equals a one-shot decode of the whole sequence."""

import json

import pytest
import torch
from safetensors.torch import save_file

from lingbot_ray.models.tiny_decoder import (
    MemBlock,
    StreamingTinyDecoder,
    TGrow,
    TinyAutoencoder,
    TinyDecoderConfig,
    load_tiny_autoencoder,
    save_tiny_autoencoder,
)
from lingbot_ray.models.vae_streaming import DecodeCache

LATENT_HW = (4, 6)
PIXEL_HW = (32, 48)
CHUNK = 3  # latent frames per chunk, as the DiT produces them
NUM_CHUNKS = 4
NARROW = TinyDecoderConfig(encoder_width=8, decoder_widths=(16, 8, 8, 8))
# taew2_1: 64 encoder tensors (2 convs w/ bias, 3 TPool, 3 strided convs, 9 MemBlocks x 6) and 64 decoder
# tensors (2 convs w/ bias, 9 MemBlocks x 6, 3 TGrow, 3 bias-free convs).
PUBLISHED_TENSOR_COUNT = 128


def _random_model(config=NARROW, seed=0):
    """Random weights scaled so that frames vary (std ~0.15 around mid-grey, none clamped) and a
    latent frame still changes frames 10 latent frames later: the default init fades to a constant."""
    torch.manual_seed(seed)
    model = TinyAutoencoder(config).eval()
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name.endswith("bias"):
                tensor.uniform_(-0.1, 0.1)
            else:
                tensor.normal_(0.0, 0.7 * (2.0 / tensor[0].numel()) ** 0.5)
        model.decoder[-1].bias.fill_(0.5)
    return model


def _latents(seed, frames=CHUNK * NUM_CHUNKS, batch=1, hw=LATENT_HW):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 16, frames, *hw, generator=g)  # NCTHW, as the DiT produces them


def _one_shot(model, latents_ncthw):
    """The whole sequence through `decode_video`, mapped to the streaming convention ([-1, 1], NCTHW)."""
    with torch.no_grad():
        return (model.decode_video(latents_ncthw.movedim(2, 1)) * 2 - 1).movedim(1, 2)


def _stream(decoder, latents, chunk=CHUNK, cache=None):
    cache = cache or decoder.new_decode_cache()
    pieces = []
    for start in range(0, latents.shape[2], chunk):
        frames, cache = decoder.decode_chunk(latents[:, :, start : start + chunk], cache)
        pieces.append(frames)
    return pieces, cache


def _reference_decode(model, latents_ntchw):
    """TAEHV's sequential definition, one time step at a time (independent of the parallel runner):
    every MemBlock pairs each input frame with its own previous input (zeros first)."""
    x = latents_ntchw
    with torch.no_grad():
        for block in model.decoder:
            batch, steps = x.shape[:2]
            if isinstance(block, MemBlock):
                outputs, past = [], torch.zeros_like(x[:, 0])
                for t in range(steps):
                    outputs.append(block(x[:, t], past))
                    past = x[:, t]
                x = torch.stack(outputs, dim=1)
            elif isinstance(block, TGrow):  # each step becomes `stride` steps, in time order
                x = torch.stack([block(x[:, t : t + 1]) for t in range(steps)], dim=1).flatten(1, 2)
            else:
                x = torch.stack([block(x[:, t]) for t in range(steps)], dim=1)
    return x.clamp(0, 1)[:, model.frames_to_trim :]


# ------------------------------------------------------------------------------------------ config


def test_default_config_is_taew2_1_and_round_trips():
    config = TinyDecoderConfig()
    assert config.t_upscale == 4 and config.t_downscale == 4 and config.spatial_scale == 8
    assert TinyDecoderConfig(patch_size=2).spatial_scale == 16
    assert TinyDecoderConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert TinyDecoderConfig.from_dict({"decoder_widths": [64, 32, 16, 16]}).decoder_widths == (64, 32, 16, 16)


@pytest.mark.parametrize(
    "data, named",
    [
        ({"decoder_widths": [64, 32, 16]}, "decoder_widths"),
        ({"decoder_widths": [64, 32, 0, 16]}, "decoder_widths"),
        ({"latent_channels": 0}, "latent_channels"),
        ({"patch_size": True}, "patch_size"),
        ({"decoder_time_upscale": [1, 1, 1]}, "decoder_time_upscale"),
        ({"width": 64}, "width"),
    ],
)
def test_config_rejects_bad_values_by_name(data, named):
    with pytest.raises(ValueError, match=named):
        TinyDecoderConfig.from_dict(data)


# ------------------------------------------------------------------------------------------ loading


@pytest.fixture(scope="module")
def published_state_dict():
    """Random tensors in the published taew2_1 layout (what `taew2_1.pth` holds)."""
    torch.manual_seed(0)
    return {k: v.clone() for k, v in TinyAutoencoder().state_dict().items()}


def test_published_layout_shapes(published_state_dict):
    shapes = {k: list(v.shape) for k, v in published_state_dict.items()}
    assert shapes["decoder.1.weight"] == [256, 16, 3, 3]
    assert shapes["decoder.3.conv.0.weight"] == [256, 512, 3, 3]
    assert shapes["decoder.7.conv.weight"] == [256, 256, 1, 1]
    assert shapes["decoder.13.conv.weight"] == [256, 128, 1, 1]
    assert shapes["decoder.19.conv.weight"] == [128, 64, 1, 1]
    assert shapes["decoder.22.weight"] == [3, 64, 3, 3]
    assert shapes["encoder.0.weight"] == [64, 3, 3, 3]
    assert shapes["encoder.2.conv.weight"] == [64, 128, 1, 1]  # TPool(64, 2): 1x1 conv 128 -> 64
    assert shapes["encoder.17.weight"] == [16, 64, 3, 3]
    assert "decoder.8.bias" not in shapes and "encoder.3.bias" not in shapes
    assert len(shapes) == PUBLISHED_TENSOR_COUNT


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_published_file_loads_strictly(tmp_path, published_state_dict, suffix):
    path = tmp_path / f"taew2_1{suffix}"
    if suffix == ".pth":
        torch.save(published_state_dict, path)
    else:
        save_file(published_state_dict, str(path))
    model = load_tiny_autoencoder(path)
    assert not model.training and model.config == TinyDecoderConfig()
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in published_state_dict.items())
    half = load_tiny_autoencoder(path, dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16


def _expect_load_error(tmp_path, state_dict, *needles):
    path = tmp_path / "bad.pth"
    torch.save(state_dict, path)
    with pytest.raises(ValueError) as info:
        load_tiny_autoencoder(path)
    message = str(info.value)
    assert "bad.pth" in message
    for needle in needles:
        assert needle in message, message
    return message


def test_missing_unexpected_and_misshaped_keys_are_named_together(tmp_path, published_state_dict):
    sd = dict(published_state_dict)
    del sd["decoder.15.conv.2.weight"]
    sd["decoder.23.weight"] = torch.zeros(3)
    sd["encoder.17.weight"] = torch.zeros(12, 64, 3, 3)
    _expect_load_error(
        tmp_path, sd, "missing 1: decoder.15.conv.2.weight", "unexpected 1: decoder.23.weight",
        "encoder.17.weight checkpoint [12, 64, 3, 3] vs model [16, 64, 3, 3]",
    )


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda sd: sd.pop("decoder.1.bias"), "missing 1: decoder.1.bias"),
        (lambda sd: sd.update({"decoder.0.weight": torch.zeros(1)}), "unexpected 1: decoder.0.weight"),
        (lambda sd: sd.update({"decoder.22.weight": torch.zeros(12, 64, 3, 3)}), "decoder.22.weight"),
    ],
)
def test_each_mismatch_is_named(tmp_path, published_state_dict, edit, needle):
    sd = dict(published_state_dict)
    edit(sd)
    _expect_load_error(tmp_path, sd, needle)


def test_old_stride_two_tgrow_keeps_its_last_rows(tmp_path, published_state_dict):
    sd = dict(published_state_dict)
    old = torch.randn(512, 256, 1, 1)
    sd["decoder.7.conv.weight"] = old
    path = tmp_path / "old.pth"
    torch.save(sd, path)
    model = load_tiny_autoencoder(path)
    assert torch.equal(model.decoder[7].conv.weight, old[256:])
    # Only a larger multiple of the channels is cut: 300 rows is a plain mismatch.
    sd["decoder.7.conv.weight"] = torch.randn(300, 256, 1, 1)
    _expect_load_error(tmp_path, sd, "decoder.7.conv.weight checkpoint [300, 256, 1, 1] vs model [256, 256, 1, 1]")


def test_bad_paths(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_tiny_autoencoder(tmp_path / "absent.pth")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown suffix '.bin'"):
        load_tiny_autoencoder(tmp_path / "weights.bin")
    with pytest.raises(ValueError, match="config.json"):
        load_tiny_autoencoder(tmp_path)


def test_own_folder_round_trip(tmp_path):
    model = _random_model(seed=3)
    folder = save_tiny_autoencoder(model, tmp_path / "tiny")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_tiny_autoencoder(folder)
    assert loaded.config == NARROW
    latents = _latents(1, frames=4).movedim(2, 1)
    with torch.no_grad():
        assert torch.equal(loaded.decode_video(latents), model.decode_video(latents))
    with pytest.raises(ValueError, match="differs"):
        load_tiny_autoencoder(folder, config=TinyDecoderConfig())


def test_folder_config_with_unknown_key_is_named(tmp_path):
    folder = save_tiny_autoencoder(_random_model(), tmp_path / "tiny")
    data = json.loads((folder / "config.json").read_text())
    data["decoder_depth"] = 3
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="decoder_depth") as info:
        load_tiny_autoencoder(folder)
    assert "config.json" in str(info.value)


# ------------------------------------------------------------------------------------------ decode


@pytest.fixture(scope="module")
def model():
    return _random_model(seed=0)


@pytest.fixture(scope="module")
def decoder(model):
    return StreamingTinyDecoder(model)


def test_decode_video_matches_the_sequential_definition(model):
    latents = _latents(2, frames=5).movedim(2, 1)
    with torch.no_grad():
        frames = model.decode_video(latents)
    assert frames.shape == (1, 1 + 4 * 4, 3, *PIXEL_HW)
    torch.testing.assert_close(frames, _reference_decode(model, latents), atol=1e-5, rtol=0)
    assert frames.std() > 0.05  # not a constant image: the comparison means something


@pytest.mark.parametrize("chunk, counts", [(CHUNK, [9, 12, 12, 12]), (1, [1] + [4] * 11)])
def test_streamed_decode_equals_one_shot(model, decoder, chunk, counts):
    latents = _latents(4)
    pieces, cache = _stream(decoder, latents, chunk=chunk)
    assert [p.shape[2] for p in pieces] == counts
    assert [decoder.num_pixel_frames(chunk, first_chunk=i == 0) for i in range(len(counts))] == counts
    assert cache.num_latent_frames == 12 and cache.num_pixel_frames == 45
    streamed = torch.cat(pieces, dim=2)
    assert streamed.shape == (1, 3, 45, *PIXEL_HW)
    torch.testing.assert_close(streamed, _one_shot(model, latents), atol=1e-5, rtol=0)
    assert streamed.min() >= -1.0 and streamed.max() <= 1.0


def test_batched_sessions_and_patch_size():
    config = TinyDecoderConfig(patch_size=2, encoder_width=8, decoder_widths=(16, 8, 8, 8))
    model = _random_model(config, seed=5)
    latents = _latents(6, frames=6, batch=2)
    pieces, _ = _stream(StreamingTinyDecoder(model), latents)
    streamed = torch.cat(pieces, dim=2)
    assert streamed.shape == (2, 3, 21, 64, 96)
    torch.testing.assert_close(streamed, _one_shot(model, latents), atol=1e-5, rtol=0)


def _skip_reference(model, latents):
    """The linear skip written out pixel by pixel: frame ``4(k−1) + 1 + t`` (latent frame k ≥ 1) at
    (y, x) is ``rest`` row (t, colour, y mod 8, x mod 8) times the latent at (y // 8, x // 8); frame 0 is
    ``first``'s row (colour, y mod 8, x mod 8) times latent frame 0. [N, C, F, h, w] → [N, 3, T, H, W]."""
    skip = model.skip
    first = skip.first.weight[:, :, 0, 0].reshape(3, 8, 8, -1)
    rest = skip.rest.weight[:, :, 0, 0].reshape(4, 3, 8, 8, -1)
    b_first, b_rest = skip.first.bias.reshape(3, 8, 8), skip.rest.bias.reshape(4, 3, 8, 8)
    frame0 = torch.einsum("cyxz,nzhw->nchywx", first, latents[:, :, 0]) + b_first[None, :, None, :, None, :]
    later = torch.einsum("tcyxz,nzfhw->nfthcywx", rest, latents[:, :, 1:]) + b_rest[None, None, :, None, :, :, None, :]
    n, _, h, _, w, _ = frame0.shape
    frame0 = frame0.reshape(n, 3, 1, h * 8, w * 8)
    later = later.permute(0, 4, 1, 2, 3, 5, 6, 7).reshape(n, 3, -1, h * 8, w * 8)
    return torch.cat([frame0, later], dim=2)


def test_linear_skip_maps_each_latent_to_its_pixels_and_streams(tmp_path):
    config = TinyDecoderConfig(encoder_width=8, decoder_widths=(16, 8, 8, 8), linear_skip=True)
    model = _random_model(config, seed=7)
    latents = _latents(8, frames=6)
    with torch.no_grad():
        model.skip.first.weight.mul_(0.05), model.skip.rest.weight.mul_(0.05)
        model.skip.first.bias.fill_(0.5), model.skip.rest.bias.fill_(0.5)
        both = _one_shot(model, latents)
        convs = model.decoder[-1]
        saved = convs.weight.clone(), convs.bias.clone()
        convs.weight.zero_(), convs.bias.zero_()  # the decoder's own path adds nothing: the skip alone
        alone = _one_shot(model, latents)
        convs.weight.copy_(saved[0]), convs.bias.copy_(saved[1])
        reference = _skip_reference(model, latents).clamp(0, 1) * 2 - 1
    torch.testing.assert_close(alone, reference, atol=1e-5, rtol=0)
    assert 0.02 < (both - alone).abs().mean() and alone.std() > 0.05  # both paths are in the output
    for chunk in (CHUNK, 1):
        pieces, _ = _stream(StreamingTinyDecoder(model), latents, chunk=chunk)
        torch.testing.assert_close(torch.cat(pieces, dim=2), both, atol=1e-5, rtol=0)
    loaded = load_tiny_autoencoder(save_tiny_autoencoder(model, tmp_path / "tiny"))
    assert loaded.config.linear_skip and {"skip.first.weight", "skip.rest.bias"} <= set(loaded.state_dict())
    assert torch.equal(_one_shot(loaded, latents), both)


def test_cache_size_is_constant(decoder):
    cache = decoder.new_decode_cache()
    assert cache.nbytes == 0 and len(cache.feat_map) == 9
    sizes = []
    for i in range(8):
        _, cache = decoder.decode_chunk(_latents(10 + i, frames=CHUNK), cache)
        sizes.append(cache.nbytes)
    assert len(set(sizes)) == 1
    # One frame per MemBlock: 3 at the latent size (16 ch), 3 at 2x (8 ch), 3 at 4x (8 ch); fp32.
    assert sizes[0] == 4 * 3 * (16 * 24 + 8 * 24 * 4 + 8 * 24 * 16)
    cache.release()
    assert cache.nbytes == 0 and cache.num_latent_frames == 0 and cache.latent_shape is None


def _break(latents):
    return [
        (latents[:, :8], "16 channels"),
        (latents[0], "tensor"),
        (torch.randn(1, 16, CHUNK, 5, 6), "differ from the session"),
        (torch.randn(2, 16, CHUNK, *LATENT_HW), "differ from the session"),
        (latents.to(torch.int64), "floating point"),
    ]


def test_failed_chunk_leaves_the_session_as_it_was(model, decoder, monkeypatch):
    latents = _latents(7)
    expected, _ = _stream(decoder, latents)
    cache = decoder.new_decode_cache()
    got = []
    for i, start in enumerate(range(0, latents.shape[2], CHUNK)):
        chunk = latents[:, :, start : start + CHUNK]
        if i in (1, 2):
            for bad, needle in _break(chunk):
                with pytest.raises(ValueError, match=needle):
                    decoder.decode_chunk(bad, cache)
        if i == 2:
            # A failure inside the network, after the first MemBlocks have run.
            def explode(*args):
                raise RuntimeError("out of memory")

            monkeypatch.setattr(model.decoder[16], "forward", explode)
            with pytest.raises(RuntimeError, match="out of memory"):
                decoder.decode_chunk(chunk, cache)
            monkeypatch.undo()
        frames, cache = decoder.decode_chunk(chunk, cache)
        got.append(frames)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


def test_cache_of_another_decoder_is_refused(model, decoder):
    other = StreamingTinyDecoder(model)
    with pytest.raises(ValueError, match="another StreamingTinyDecoder"):
        decoder.decode_chunk(_latents(0, frames=1), other.new_decode_cache())
    with pytest.raises(ValueError, match="DecodeCache"):
        decoder.decode_chunk(_latents(0, frames=1), object())
    assert isinstance(decoder.new_decode_cache(), DecodeCache)


def test_reset_starts_a_new_video(decoder):
    latents = _latents(8, frames=CHUNK)
    first, cache = decoder.decode_chunk(latents, decoder.new_decode_cache())
    decoder.decode_chunk(_latents(9, frames=CHUNK), cache)
    cache.reset()
    again, _ = decoder.decode_chunk(latents, cache)
    assert again.shape[2] == 9 and torch.equal(again, first)


def test_bf16_decode_runs_and_stays_in_range(model):
    half = StreamingTinyDecoder(_random_model(seed=0).to(torch.bfloat16))
    frames, cache = half.decode_chunk(_latents(11, frames=2), half.new_decode_cache())
    assert frames.dtype == torch.bfloat16 and cache.dtype == torch.bfloat16
    assert frames.min() >= -1 and frames.max() <= 1
    reference = _one_shot(model, _latents(11, frames=2))
    assert (frames.float() - reference).abs().mean() < 0.05


# ------------------------------------------------------------------------------------------ encode


@pytest.mark.parametrize("latent_frames", [1, 3])
def test_encode_decode_shapes(model, latent_frames):
    frames = torch.rand(1, 1 + 4 * (latent_frames - 1), 3, *PIXEL_HW)
    with torch.no_grad():
        latents = model.encode_video(frames)
        assert latents.shape == (1, latent_frames, 16, *LATENT_HW)
        assert model.decode_video(latents).shape == frames.shape
    with pytest.raises(ValueError, match="multiple of 8"):
        model.encode_video(torch.rand(1, 1, 3, 30, 48))
    with pytest.raises(ValueError, match="frames must be"):
        model.encode_video(torch.rand(1, 3, 1, *PIXEL_HW))
