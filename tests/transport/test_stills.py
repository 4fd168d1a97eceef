import io
from concurrent.futures import ThreadPoolExecutor

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, JpegImagePlugin

from lingbot_ray.transport import FrameDecoder, make_encoder, preview_size
from tests.transport.strategies import frame_stacks, psnr, smooth_frames

STILLS = ["webp", "jpeg"]


def images(batch):
    view, offset = batch.payload, 0
    for length in batch.payload_lengths:
        yield Image.open(io.BytesIO(view[offset : offset + length]))
        offset += length


@pytest.mark.parametrize("fmt", STILLS)
@settings(max_examples=15, deadline=None)
@given(frames=frame_stacks(max_frames=18, max_side=20), max_width=st.one_of(st.none(), st.integers(1, 24)))
def test_stills_round_trip_to_preview_dims(fmt, frames, max_width):
    num_frames, height, width, _ = frames.shape
    batches = make_encoder(fmt, preview_max_width=max_width).encode_chunk(frames, request_id="r", chunk_index=0)
    preview = preview_size(width, height, max_width)
    decoder = FrameDecoder()
    decoded = np.concatenate([decoder.decode(b) for b in batches])
    assert decoded.shape == (num_frames, preview[1], preview[0], 3)
    for batch in batches:
        assert (batch.width, batch.height, batch.source_width, batch.source_height) == (width, height, width, height)
        assert (batch.preview_width, batch.preview_height) == preview
        assert len(batch.payload_lengths) == batch.num_frames and sum(batch.payload_lengths) == batch.total_size
        assert batch.bytes_per_frame is None and batch.delta_reference is None


@pytest.mark.parametrize("fmt", STILLS)
@settings(max_examples=10, deadline=None)
@given(height=st.integers(8, 48), width=st.integers(8, 48), phase=st.floats(0, 6))
def test_stills_are_close_on_smooth_images(fmt, height, width, phase):
    frames = smooth_frames(3, height, width, phase)
    decoded = FrameDecoder().decode(make_encoder(fmt).encode_chunk(frames, request_id="r", chunk_index=0)[0])
    assert psnr(decoded, frames) >= 30


def test_preview_is_a_bicubic_downscale():
    # Noise at near-lossless JPEG tells filters apart: bicubic matches at ~50 dB, bilinear and
    # Lanczos at ~30-34 dB, nearest at ~12 dB.
    frames = np.random.default_rng(0).integers(0, 256, (2, 40, 64, 3), dtype=np.uint8)
    encoder = make_encoder("jpeg", quality=100, preview_max_width=32)
    batch = encoder.encode_chunk(frames, request_id="r", chunk_index=0)[0]
    expected = np.stack([np.asarray(Image.fromarray(f).resize((32, 20), Image.Resampling.BICUBIC)) for f in frames])
    assert psnr(FrameDecoder().decode(batch), expected) >= 45


@pytest.mark.parametrize(
    "size, max_width, expected",
    [((832, 480), None, (832, 480)), ((832, 480), 832, (832, 480)), ((832, 480), 1000, (832, 480)),
     ((832, 480), 416, (416, 240)), ((100, 33), 50, (50, 17)), ((100, 1), 10, (10, 1)), ((3, 2), 1, (1, 1))],
)
def test_preview_size_keeps_aspect_and_only_shrinks(size, max_width, expected):
    assert preview_size(*size, max_width) == expected


def test_jpeg_is_444_and_uses_default_quality_95():
    frames = smooth_frames(2, 32, 48, 0.0)
    batch = make_encoder("jpeg").encode_chunk(frames, request_id="r", chunk_index=0)[0]
    for image, frame in zip(images(batch), frames):
        assert image.format == "JPEG" and JpegImagePlugin.get_sampling(image) == 0  # 0 = 4:4:4
        reference = io.BytesIO()
        Image.fromarray(frame).save(reference, "JPEG", quality=95, subsampling=0)
        assert image.fp.getvalue() == reference.getvalue()


def test_webp_frames_are_independent_stills_at_default_quality_90():
    frames = smooth_frames(3, 32, 48, 0.0)
    encoder = make_encoder("webp")
    batch = encoder.encode_chunk(frames, request_id="r", chunk_index=0)[0]
    for image, frame in zip(images(batch), frames):
        assert image.format == "WEBP" and not getattr(image, "is_animated", False)
        assert image.fp.getvalue()[12:16] != b"VP8X"  # simple lossy file: no extended/animation chunks
        reference = io.BytesIO()
        Image.fromarray(frame).save(reference, "WEBP", quality=90, method=encoder.method)
        assert image.fp.getvalue() == reference.getvalue()


@pytest.mark.parametrize("fmt", STILLS)
def test_quality_changes_the_output(fmt):
    frames = smooth_frames(1, 32, 32, 0.0)
    low, high = (make_encoder(fmt, quality=q).encode_chunk(frames, request_id="r", chunk_index=0)[0] for q in (20, 95))
    assert low.total_size < high.total_size


@pytest.mark.parametrize("fmt", STILLS)
@pytest.mark.parametrize("options, message", [
    (dict(quality=0), "quality must be an integer in 1..100, got 0"),
    (dict(quality=101), "got 101"),
    (dict(quality=9.5), "got 9.5"),
    (dict(preview_max_width=0), "preview_max_width must be a positive integer, got 0"),
])
def test_still_options_are_validated(fmt, options, message):
    with pytest.raises(ValueError, match=message):
        make_encoder(fmt, **options)


def test_frames_encode_on_the_given_executor():
    submitted = []

    class CountingPool(ThreadPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):
            submitted.append(fn)
            return super().submit(fn, *args, **kwargs)

    with CountingPool(2) as pool:
        make_encoder("webp", executor=pool).encode_chunk(smooth_frames(4, 8, 8, 0), request_id="r", chunk_index=0)
    assert len(submitted) == 4


def test_decoder_checks_payload_lengths_and_image_type():
    batch = make_encoder("jpeg").encode_chunk(smooth_frames(2, 8, 8, 0), request_id="r", chunk_index=0)[0]
    with pytest.raises(ValueError, match="payload_lengths sum to"):
        FrameDecoder().decode(msgspec.structs.replace(batch, payload_lengths=[1, 2]))
    with pytest.raises(ValueError, match="for num_frames=2"):
        FrameDecoder().decode(msgspec.structs.replace(batch, payload_lengths=[len(batch.payload)]))
    with pytest.raises(ValueError, match="webp frame 0 does not decode"):
        FrameDecoder().decode(msgspec.structs.replace(batch, encoding="webp"))
    with pytest.raises(ValueError, match=r"frame 0 has shape \(8, 8, 3\), expected \(4, 8, 3\)"):
        FrameDecoder().decode(msgspec.structs.replace(batch, preview_height=4))
