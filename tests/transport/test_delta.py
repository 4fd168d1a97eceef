import gzip
import zlib

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lingbot_ray.transport import HEADER_ROOM_BYTES, FrameDecoder, make_encoder
from lingbot_ray.transport.delta import gzip_bound
from tests.transport.strategies import frame_stacks

PREVIOUS = "previous-frame"


def encode(encoder, frames, chunk_index, event_id=None):
    return encoder.encode_chunk(frames, request_id="r", chunk_index=chunk_index, event_id=event_id)


def gunzip(batch) -> np.ndarray:
    return np.frombuffer(gzip.decompress(batch.payload), np.uint8).reshape(batch.num_frames, -1)


def small_limit_encoder(frame_bytes, frames_per_message=2):
    # Room for exactly frames_per_message frames per message (request_id "r"), so chunks split.
    limit = HEADER_ROOM_BYTES + 1 + gzip_bound(frames_per_message * frame_bytes)
    return make_encoder(None, max_message_bytes=limit)


@settings(max_examples=25, deadline=None)
@given(
    chunks=st.lists(frame_stacks(max_frames=7, max_side=8), min_size=1, max_size=4),
    event_ids=st.lists(st.one_of(st.none(), st.integers(0, 2)), min_size=4, max_size=4),
    frames_per_message=st.integers(1, 8),
)
def test_delta_round_trip_is_byte_exact_across_chunks(chunks, event_ids, frames_per_message):
    shape = chunks[0].shape[1:]
    chunks = [np.resize(c, (len(c), *shape)) for c in chunks]  # one session, one frame size
    encoder = small_limit_encoder(chunks[0][0].nbytes, frames_per_message)
    decoder = FrameDecoder()
    for index, (frames, event_id) in enumerate(zip(chunks, event_ids)):
        batches = encode(encoder, frames, index, event_id)
        for batch in batches:
            assert batch.raw_size == batch.num_frames * batch.bytes_per_frame and batch.channels == 3
        np.testing.assert_array_equal(np.concatenate([decoder.decode(b) for b in batches]), frames)


@settings(max_examples=25, deadline=None)
@given(first=frame_stacks(max_frames=6), second=frame_stacks(max_frames=6), frames_per_message=st.integers(1, 6))
def test_stdlib_gunzip_gives_the_xor_chain(first, second, frames_per_message):
    second = np.resize(second, (len(second), *first.shape[1:]))
    encoder = small_limit_encoder(first[0].nbytes, frames_per_message)
    sent = np.concatenate([encode(encoder, first, 0), encode(encoder, second, 1)])
    frames = np.concatenate([first, second]).reshape(len(first) + len(second), -1)
    expected = frames.copy()
    for i in range(1, len(frames)):  # every frame but the session's first is XORed with its predecessor
        expected[i] = frames[i] ^ frames[i - 1]
    np.testing.assert_array_equal(np.concatenate([gunzip(b) for b in sent]), expected)
    for batch in sent:
        member = zlib.decompressobj(wbits=31)
        member.decompress(batch.payload)
        assert member.eof and member.unused_data == b"", "payload must be exactly one gzip member"


def test_key_frames_at_chunk_zero_and_on_event_change_only():
    rng = np.random.default_rng(1)
    chunk = lambda: rng.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)  # noqa: E731
    encoder = small_limit_encoder(4 * 4 * 3, frames_per_message=2)
    plan = [(0, None, "key"), (1, None, "delta"), (2, 3, "key"), (3, 3, "delta"), (4, 4, "key"), (5, None, "key")]
    for chunk_index, event_id, kind in plan:
        frames = chunk()
        batches = encode(encoder, frames, chunk_index, event_id)
        assert len(batches) == 3
        assert [b.delta_reference for b in batches[1:]] == [PREVIOUS, PREVIOUS]  # continuations are always deltas
        first = gunzip(batches[0])[0]
        if kind == "key":
            assert batches[0].delta_reference is None
            np.testing.assert_array_equal(first, frames[0].reshape(-1))
        else:
            assert batches[0].delta_reference == PREVIOUS
            np.testing.assert_array_equal(first, (frames[0] ^ previous_last).reshape(-1))
        previous_last = frames[-1]


def test_reset_and_chunk_zero_restart_with_a_key_frame():
    frames = np.full((2, 2, 2, 3), 9, np.uint8)
    encoder = make_encoder(None)
    encode(encoder, frames, 0)
    assert encode(encoder, frames, 1)[0].delta_reference == PREVIOUS
    assert encode(encoder, frames, 0)[0].delta_reference is None
    encoder.reset()
    assert encode(encoder, frames, 5)[0].delta_reference is None


def test_encoder_keeps_its_own_copy_of_the_reference():
    encoder, decoder = make_encoder(None), FrameDecoder()
    buffer = np.random.default_rng(2).integers(0, 256, (3, 4, 5, 3), dtype=np.uint8)
    expected = buffer.copy()
    decoder.decode(encode(encoder, buffer, 0)[0])
    buffer[:] = 0  # a caller reusing its frame buffer for the next chunk
    np.testing.assert_array_equal(decoder.decode(encode(encoder, expected, 1)[0]), expected)


def test_decoder_rejects_inconsistent_batches():
    frames = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
    encoder = make_encoder(None)
    key = encode(encoder, frames, 0)[0]
    delta = encode(encoder, frames, 1)[0]
    with pytest.raises(ValueError, match="no previous frame"):
        FrameDecoder().decode(delta)
    with pytest.raises(ValueError, match="inflates to 72 bytes, expected bytes_per_frame x num_frames = 36 x 3"):
        FrameDecoder().decode(msgspec.structs.replace(key, num_frames=3))
    with pytest.raises(ValueError, match="exactly one complete gzip member"):
        FrameDecoder().decode(msgspec.structs.replace(key, payload=key.payload + key.payload))
    with pytest.raises(ValueError, match="exactly one complete gzip member"):
        FrameDecoder().decode(msgspec.structs.replace(key, payload=key.payload[:-4]))
    with pytest.raises(ValueError, match="not valid gzip"):
        FrameDecoder().decode(msgspec.structs.replace(key, payload=b"not gzip at all"))
    decoder = FrameDecoder()
    decoder.decode(key)
    np.testing.assert_array_equal(decoder.decode(delta), frames)


@pytest.mark.parametrize("raw_frames_per_budget", [2, 5])
def test_incompressible_batches_stay_within_the_payload_budget(raw_frames_per_budget):
    # Noise does not compress: gzip adds framing, so a budget of exactly k raw frames fits k - 1.
    frames = np.random.default_rng(3).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    budget = raw_frames_per_budget * frames[0].nbytes
    encoder = make_encoder(None, max_message_bytes=HEADER_ROOM_BYTES + 1 + budget)
    batches = encode(encoder, frames, 0)
    assert max(b.num_frames for b in batches) == raw_frames_per_budget - 1
    assert all(b.total_size <= budget for b in batches)
    with pytest.raises(ValueError, match=f"one frame needs up to {gzip_bound(frames[0].nbytes)} payload bytes"):
        encode(make_encoder(None, max_message_bytes=HEADER_ROOM_BYTES + 1 + frames[0].nbytes), frames, 0)


def test_gzip_bound_holds_for_large_incompressible_frames():
    frames = np.random.default_rng(4).integers(0, 256, (2, 512, 700, 3), dtype=np.uint8)  # 1 MiB each
    batch = encode(make_encoder(None), frames, 0)[0]
    assert frames.nbytes < batch.total_size <= gzip_bound(frames.nbytes)
