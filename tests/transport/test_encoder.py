import numpy as np
import pytest

from lingbot_ray.transport import (
    HEADER_ROOM_BYTES,
    DeltaGzipEncoder,
    JpegEncoder,
    RawEncoder,
    WebPEncoder,
    check_frames,
    make_encoder,
)


@pytest.mark.parametrize(
    "frames, message",
    [
        ([[[[0, 0, 0]]]], "numpy array"),
        (np.zeros((1, 2, 2, 3), np.float32), "uint8"),
        (np.zeros((2, 2, 3), np.uint8), "[N, H, W, 3]"),
        (np.zeros((1, 2, 2, 4), np.uint8), "[N, H, W, 3]"),
        (np.zeros((0, 2, 2, 3), np.uint8), "empty"),
    ],
)
def test_check_frames_rejects_bad_input_naming_the_problem(frames, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        check_frames(frames)


def test_check_frames_makes_strided_input_contiguous():
    frames = np.arange(2 * 4 * 6 * 3, dtype=np.uint8).reshape(2, 4, 6, 3)[:, :, ::2]
    checked = check_frames(frames)
    assert checked.flags.c_contiguous
    np.testing.assert_array_equal(checked, frames)


def test_encode_chunk_validates_frames():
    with pytest.raises(ValueError, match="uint8"):
        make_encoder("raw").encode_chunk(np.zeros((1, 2, 2, 3), np.int16), request_id="r", chunk_index=0)


@pytest.mark.parametrize(
    "fmt, cls, content_type, encoding",
    [
        (None, DeltaGzipEncoder, "application/x-raw-rgb-delta-gzip", "delta-gzip"),
        ("delta-gzip", DeltaGzipEncoder, "application/x-raw-rgb-delta-gzip", "delta-gzip"),
        ("raw", RawEncoder, "application/x-raw-rgb", "raw"),
        ("webp", WebPEncoder, "image/webp", "webp"),
        ("jpeg", JpegEncoder, "image/jpeg", "jpeg"),
    ],
)
def test_make_encoder_picks_the_format(fmt, cls, content_type, encoding):
    encoder = make_encoder(fmt)
    assert type(encoder) is cls
    batch = encoder.encode_chunk(np.zeros((1, 4, 4, 3), np.uint8), request_id="r", chunk_index=0)[0]
    assert (batch.content_type, batch.encoding) == (content_type, encoding)


def test_make_encoder_rejects_unknown_format_and_tiny_limit():
    with pytest.raises(ValueError, match="'png'"):
        make_encoder("png")
    with pytest.raises(ValueError, match=f"max_message_bytes={HEADER_ROOM_BYTES}"):
        make_encoder("raw", max_message_bytes=HEADER_ROOM_BYTES)


def test_lossless_formats_ignore_still_options():
    frames = np.full((1, 4, 8, 3), 7, np.uint8)
    batch = make_encoder("raw", quality=5, preview_max_width=2).encode_chunk(frames, request_id="r", chunk_index=0)[0]
    assert (batch.width, batch.height, batch.payload) == (8, 4, frames.tobytes())
