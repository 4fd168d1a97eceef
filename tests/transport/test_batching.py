import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lingbot_ray.protocol import encode_server_message
from lingbot_ray.transport import HEADER_ROOM_BYTES, MAX_FRAMES_PER_BATCH, FrameDecoder, make_encoder
from lingbot_ray.transport.batching import payload_budget, split_by_size, split_uniform
from tests.msgpack_subset import walk

FORMATS = [None, "raw", "webp", "jpeg"]


def assert_partition(ranges, n):
    assert [r.start for r in ranges] == [0] + [r.stop for r in ranges[:-1]]
    assert ranges[-1].stop == n and all(len(r) > 0 for r in ranges)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 60), st.integers(1, 5000), st.integers(1, 50_000))
def test_split_uniform_fewest_near_equal_batches_within_limits(num_frames, frame_bytes, budget):
    bound = lambda k: k * frame_bytes + 10  # noqa: E731
    if bound(1) > budget:
        with pytest.raises(ValueError, match=f"{bound(1)} payload bytes.*{budget}"):
            split_uniform(num_frames, bound, budget)
        return
    ranges = split_uniform(num_frames, bound, budget)
    assert_partition(ranges, num_frames)
    assert all(len(r) <= MAX_FRAMES_PER_BATCH and bound(len(r)) <= budget for r in ranges)
    fit = max(k for k in range(1, MAX_FRAMES_PER_BATCH + 1) if bound(k) <= budget)
    assert len(ranges) == -(-num_frames // fit)
    assert max(map(len, ranges)) - min(map(len, ranges)) <= 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 100), min_size=1, max_size=50), st.integers(1, 400))
def test_split_by_size_packs_greedily_within_limits(sizes, budget):
    if max(sizes) > budget:
        index = next(i for i, size in enumerate(sizes) if size > budget)
        with pytest.raises(ValueError, match=f"frame {index} encodes to {sizes[index]} bytes.*{budget}"):
            split_by_size(sizes, budget)
        return
    ranges = split_by_size(sizes, budget)
    assert_partition(ranges, len(sizes))
    for current, following in zip(ranges, ranges[1:] + [None]):
        total = sum(sizes[i] for i in current)
        assert len(current) <= MAX_FRAMES_PER_BATCH and total <= budget
        if following is not None:  # closed only because the next frame would not fit
            assert len(current) == MAX_FRAMES_PER_BATCH or total + sizes[following.start] > budget


def test_payload_budget_leaves_header_room_and_rejects_tiny_limits():
    assert payload_budget(10_000, "abc") == 10_000 - HEADER_ROOM_BYTES - 3
    with pytest.raises(ValueError, match="max_message_bytes=1500"):
        payload_budget(1500, "x" * 600)


def noise(num_frames, height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (num_frames, height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=12, deadline=None)
@given(num_frames=st.integers(1, 20), extra=st.integers(0, 3000), request_id=st.text(max_size=40))
def test_every_message_fits_the_limit_and_the_wire_subset(fmt, num_frames, extra, request_id):
    # Noise is incompressible: the worst case for the delta-gzip size bound.
    frames = noise(num_frames, 16, 20)
    limit = HEADER_ROOM_BYTES + len(request_id.encode()) + 16 * 20 * 3 * 2 + extra
    batches = make_encoder(fmt, max_message_bytes=limit).encode_chunk(
        frames, request_id=request_id, chunk_index=3, event_id=None, fps=16
    )
    for batch in batches:
        message = encode_server_message(batch)
        assert len(message) <= limit
        assert batch.total_size <= payload_budget(limit, request_id)
        fields = walk(message)
        assert "event_id" not in fields
        assert fields["num_frames"] <= MAX_FRAMES_PER_BATCH
    decoder = FrameDecoder()
    assert sum(len(decoder.decode(batch)) for batch in batches) == num_frames


@pytest.mark.parametrize("fmt", FORMATS)
def test_batch_numbering_and_common_fields(fmt):
    frames = noise(40, 4, 6)
    batches = make_encoder(fmt).encode_chunk(frames, request_id="req-9", chunk_index=7, event_id=12, fps=25)
    assert len(batches) == 3  # 40 frames, at most 15 per batch
    assert [b.frame_batch_index for b in batches] == [0, 1, 2]
    assert [b.is_final_frame_batch for b in batches] == [False, False, True]
    assert sum(b.num_frames for b in batches) == 40
    for batch in batches:
        assert batch.num_frames <= MAX_FRAMES_PER_BATCH
        assert (batch.request_id, batch.chunk_index, batch.event_id, batch.fps) == ("req-9", 7, 12, 25.0)
        assert (batch.width, batch.height, batch.num_frame_batches) == (6, 4, 3)
        assert batch.total_size == len(batch.payload)
        assert msgspec.msgpack.decode(encode_server_message(batch))["event_id"] == 12


@pytest.mark.parametrize("fmt", ["raw", None])
def test_single_frame_over_the_limit_names_the_sizes(fmt):
    message = r"one frame needs up to \d+ payload bytes but a frame_batch may carry only 976"
    with pytest.raises(ValueError, match=message):
        make_encoder(fmt, max_message_bytes=2000).encode_chunk(noise(1, 40, 40), request_id="", chunk_index=0)


@pytest.mark.parametrize("fmt", ["webp", "jpeg"])
def test_single_still_over_the_limit_names_the_sizes(fmt):
    with pytest.raises(ValueError, match=r"frame 0 encodes to \d+ bytes but a frame_batch may carry only 976"):
        make_encoder(fmt, max_message_bytes=2000).encode_chunk(noise(1, 64, 64), request_id="", chunk_index=0)
