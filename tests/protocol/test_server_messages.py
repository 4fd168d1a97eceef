import msgspec
import pytest

from lingbot_ray.protocol import (
    GENERATION_COMPLETE,
    CapacityError,
    ChunkStats,
    CloseCode,
    ErrorMessage,
    FrameBatch,
    InvalidEvent,
    InvalidInit,
    encode_server_message,
    outcome_for,
)
from lingbot_ray.protocol.errors import AuthError
from tests.msgpack_subset import SubsetViolation, walk


def frame_batch(**overrides):
    fields = dict(
        request_id="req-1",
        chunk_index=0,
        content_type="application/x-raw-rgb",
        encoding="raw",
        num_frames=2,
        width=832,
        height=480,
        total_size=2 * 832 * 480 * 3,
        frame_batch_index=0,
        num_frame_batches=1,
        is_final_frame_batch=True,
        payload=bytes(2 * 832 * 480 * 3),
        format="rgb24",
        channels=3,
        bytes_per_frame=832 * 480 * 3,
        raw_size=2 * 832 * 480 * 3,
        fps=16.0,
    )
    fields.update(overrides)
    return FrameBatch(**fields)


def chunk_stats(**overrides):
    fields = dict(
        session_id="s",
        request_id="r",
        chunk_index=3,
        event_id=None,
        num_frames=12,
        num_batches=2,
        content_type="image/webp",
        raw_bytes=14_376_960,
        ws_payload_bytes=300_000,
        request_prepare_ms=1,
        scheduler_forward_ms=4500,
        pace_wait_ms=0,
        header_write_ms=0,
        raw_payload_build_ms=40,
        raw_write_ms=3,
        ws_write_ms=3,
        chunk_total_ms=5000,
        dit_ms=4000,
        replica_id="DiTGroup#abc",
    )
    fields.update(overrides)
    return ChunkStats(**fields)


REAL_MESSAGES = [
    frame_batch(),
    frame_batch(event_id=2**32 - 1, delta_reference="previous-frame", encoding="delta-gzip"),
    frame_batch(
        content_type="image/webp",
        encoding="webp",
        format=None,
        bytes_per_frame=None,
        raw_size=None,
        payload=b"x" * 70_000,
        total_size=70_000,
        num_frames=15,
        payload_lengths=[4666] * 14 + [70_000 - 4666 * 14],
        source_width=832,
        source_height=480,
        preview_width=416,
        preview_height=240,
    ),
    chunk_stats(),
    chunk_stats(event_id=12, fps=32.0),
    chunk_stats(num_inference_steps=2),
    ErrorMessage(content="invalid generate request", detail="size='1x1': too small"),
    ErrorMessage(content="x" * 70_000),
]


@pytest.mark.parametrize("message", REAL_MESSAGES, ids=lambda m: type(m).__name__)
def test_real_messages_stay_in_the_reference_msgpack_subset(message):
    encoded = encode_server_message(message)
    decoded = walk(encoded)
    assert decoded == msgspec.msgpack.decode(encoded)
    assert decoded["type"] in ("frame_batch", "chunk_stats", "error")


def test_walker_rejects_what_the_reference_decoder_cannot_read():
    for bad in (-1, 2**40, [0] * 16, "x" * 70_000, 1.5):
        encoded = msgspec.msgpack.encode(bad)
        if isinstance(bad, float):
            encoded = b"\xca" + encoded[1:5]  # float32 is outside the subset
        with pytest.raises(SubsetViolation):
            walk(encoded)


def test_event_id_omitted_from_frame_batch_but_nil_in_stats():
    assert "event_id" not in walk(encode_server_message(frame_batch()))
    assert walk(encode_server_message(frame_batch(event_id=4)))["event_id"] == 4
    stats = walk(encode_server_message(chunk_stats()))
    assert "event_id" in stats and stats["event_id"] is None
    assert "payload_lengths" not in walk(encode_server_message(frame_batch()))


def test_chunk_stats_report_the_denoising_steps_run():
    # The reference server (SGLang-diffusion's DMD timestep stage) ignores num_inference_steps and
    # always runs its 4 distilled points; this server honours it, so chunk_stats says how many ran.
    assert walk(encode_server_message(chunk_stats(num_inference_steps=2)))["num_inference_steps"] == 2
    stats = walk(encode_server_message(chunk_stats()))
    assert "num_inference_steps" in stats and stats["num_inference_steps"] is None
    with pytest.raises(ValueError, match="num_inference_steps"):
        encode_server_message(chunk_stats(num_inference_steps=-1))


def test_negative_or_oversized_fields_are_refused_before_the_wire():
    with pytest.raises(ValueError, match="chunk_index"):
        encode_server_message(frame_batch(chunk_index=-1))
    with pytest.raises(ValueError, match="raw_bytes"):
        encode_server_message(chunk_stats(raw_bytes=2**32))
    with pytest.raises(ValueError, match="payload_lengths"):
        encode_server_message(frame_batch(payload_lengths=[1] * 16))


def test_long_error_content_is_clipped_to_str16():
    decoded = walk(encode_server_message(ErrorMessage(content="é" * 40_000)))
    assert len(decoded["content"].encode()) <= 65535


def test_outcomes_map_errors_to_wire_and_close_codes_in_one_place():
    done = outcome_for(None)
    assert (done.error, done.close_code, done.close_reason) == (None, CloseCode.NORMAL, GENERATION_COMPLETE)
    bad_init = outcome_for(InvalidInit("size", "1x1", "too small"))
    assert bad_init.close_code is None and bad_init.error.content == "invalid generate request"
    assert "size" in bad_init.error.detail and "1x1" in bad_init.error.detail
    assert outcome_for(InvalidEvent("kind", "x", "bad")).error.content == "invalid event"
    full = outcome_for(CapacityError("all 2 DiT groups are full"))
    assert full.close_code == CloseCode.TRY_AGAIN_LATER == 1013 and "full" in full.error.content
    assert outcome_for(AuthError("missing API key")).close_code == 1008
    crash = outcome_for(RuntimeError("CUDA error: out of memory\nstack..."))
    assert crash.close_code == 1011
    assert crash.error.content == "error during generate loop: CUDA error: out of memory"
    long = outcome_for(RuntimeError("é" * 500))
    assert len(long.close_reason.encode()) <= 123
