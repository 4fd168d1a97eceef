"""``raw``: frames as uncompressed RGB24, row-major, concatenated."""

from __future__ import annotations

import numpy as np

from lingbot_ray.protocol.server_messages import FrameBatch

from .batching import BatchPart, split_uniform
from .encoder import ChunkEncoder

CHANNELS = 3


class RawEncoder(ChunkEncoder):
    content_type = "application/x-raw-rgb"
    encoding = "raw"

    def _encode(self, frames: np.ndarray, budget: int, *, chunk_index: int, event_id: int | None) -> list[BatchPart]:
        frame_bytes = frames[0].nbytes
        return [
            BatchPart(
                frames[batch.start : batch.stop].tobytes(),
                len(batch),
                dict(format="rgb24", channels=CHANNELS, bytes_per_frame=frame_bytes, raw_size=len(batch) * frame_bytes),
            )
            for batch in split_uniform(len(frames), lambda k: k * frame_bytes, budget)
        ]


def checked_frame_bytes(batch: FrameBatch) -> int:
    """``bytes_per_frame`` of a raw or delta-gzip batch, checked against its geometry."""
    expected = batch.width * batch.height * CHANNELS
    if batch.channels not in (None, CHANNELS):
        raise ValueError(f"{batch.encoding} batch has channels={batch.channels}, expected {CHANNELS}")
    if batch.bytes_per_frame != expected:
        raise ValueError(
            f"{batch.encoding} batch has bytes_per_frame={batch.bytes_per_frame}, expected "
            f"{batch.width}x{batch.height}x{CHANNELS}={expected}"
        )
    return expected


def decode_raw(batch: FrameBatch) -> np.ndarray:
    """Frames of a raw batch as a read-only uint8 [n, H, W, 3] view of its payload."""
    expected = checked_frame_bytes(batch) * batch.num_frames
    if len(batch.payload) != expected:
        raise ValueError(
            f"raw payload has {len(batch.payload)} bytes, expected bytes_per_frame x num_frames = {expected}"
        )
    return np.frombuffer(batch.payload, np.uint8).reshape(batch.num_frames, batch.height, batch.width, CHANNELS)
