import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lingbot_ray.transport import HEADER_ROOM_BYTES, FrameDecoder, make_encoder
from tests.transport.strategies import frame_stacks


@settings(max_examples=30, deadline=None)
@given(frames=frame_stacks(max_frames=20), frames_per_message=st.integers(1, 20))
def test_raw_round_trip_is_byte_exact(frames, frames_per_message):
    frame_bytes = frames[0].nbytes
    encoder = make_encoder("raw", max_message_bytes=HEADER_ROOM_BYTES + 1 + frames_per_message * frame_bytes)
    batches = encoder.encode_chunk(frames, request_id="r", chunk_index=0)
    assert b"".join(b.payload for b in batches) == frames.tobytes()
    for batch in batches:
        assert (batch.format, batch.channels, batch.bytes_per_frame) == ("rgb24", 3, frame_bytes)
        assert batch.raw_size == batch.total_size == batch.num_frames * frame_bytes
        assert batch.delta_reference is None and batch.payload_lengths is None
    decoder = FrameDecoder()
    np.testing.assert_array_equal(np.concatenate([decoder.decode(b) for b in batches]), frames)


def test_raw_decoder_checks_lengths():
    batch = make_encoder("raw").encode_chunk(np.zeros((2, 3, 4, 3), np.uint8), request_id="r", chunk_index=0)[0]
    with pytest.raises(ValueError, match="expected bytes_per_frame x num_frames = 72"):
        FrameDecoder().decode(msgspec.structs.replace(batch, payload=batch.payload[:-1]))
    with pytest.raises(ValueError, match="bytes_per_frame=35, expected 4x3x3=36"):
        FrameDecoder().decode(msgspec.structs.replace(batch, bytes_per_frame=35))
