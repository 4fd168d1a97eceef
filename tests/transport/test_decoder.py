import msgspec
import numpy as np
import pytest

from lingbot_ray.protocol import encode_server_message
from lingbot_ray.transport import FrameDecoder, make_encoder


@pytest.mark.parametrize("fmt", [None, "raw"])
def test_decoder_reads_messages_as_they_come_off_the_wire(fmt):
    frames = np.random.default_rng(0).integers(0, 256, (20, 5, 6, 3), dtype=np.uint8)
    encoder, decoder = make_encoder(fmt), FrameDecoder()
    for chunk_index in range(2):
        batches = encoder.encode_chunk(frames, request_id="r", chunk_index=chunk_index, event_id=chunk_index, fps=16)
        maps = [msgspec.msgpack.decode(encode_server_message(b)) for b in batches]
        assert all(isinstance(m, dict) and m["type"] == "frame_batch" for m in maps)
        np.testing.assert_array_equal(np.concatenate([decoder.decode(m) for m in maps]), frames)


def test_decoder_rejects_unknown_encodings_and_malformed_maps():
    batch = make_encoder("raw").encode_chunk(np.zeros((1, 2, 2, 3), np.uint8), request_id="r", chunk_index=0)[0]
    with pytest.raises(ValueError, match="unknown frame_batch encoding 'png'"):
        FrameDecoder().decode(msgspec.structs.replace(batch, encoding="png"))
    wire = msgspec.msgpack.decode(encode_server_message(batch))
    del wire["num_frames"]
    with pytest.raises(ValueError, match="num_frames"):
        FrameDecoder().decode(wire)
