"""``delta-gzip`` (the default format): lossless RGB as XOR deltas in one gzip member per batch.

Frame i of a chunk is sent as ``frame[i] XOR frame[i-1]`` (original frames, not reconstructions);
a batch's first frame is XORed with the previous batch's last frame and marked
``delta_reference: "previous-frame"``, except for key frames, sent as is: the first chunk, and the
first chunk after ``event_id`` changes. Slow-moving video makes the deltas mostly zeros, which
deflate shrinks well.
"""

from __future__ import annotations

from concurrent.futures import Executor

import numpy as np
from isal import isal_zlib

from lingbot_ray.protocol.server_messages import FrameBatch

from .batching import DEFAULT_MAX_MESSAGE_BYTES, BatchPart, split_uniform
from .encoder import ChunkEncoder
from .raw import CHANNELS, checked_frame_bytes

PREVIOUS_FRAME = "previous-frame"
# isal level 1 is its fastest setting that never grows data much: level 0 expands incompressible
# input by ~23%, level 1 by ~0.02% (stored blocks). Both are several times faster than zlib level 1.
GZIP_LEVEL = 1
_GZIP_WBITS = 31  # 16 + 15: a gzip header and trailer around a 32 KiB-window deflate stream


def gzip_bound(size: int) -> int:
    """Largest gzip member ``size`` input bytes can become (measured growth is ~5 bytes per 64 KiB)."""
    return size + (size >> 10) + 64


def xor_deltas(frames: np.ndarray, previous: np.ndarray | None) -> np.ndarray:
    """``[n, B]`` frames → ``[n, B]`` deltas; row 0 is XORed with ``previous`` unless it is None."""
    deltas = np.empty_like(frames)
    if previous is None:
        deltas[0] = frames[0]
    else:
        np.bitwise_xor(frames[0], previous, out=deltas[0])
    np.bitwise_xor(frames[1:], frames[:-1], out=deltas[1:])
    return deltas


def undo_deltas(deltas: np.ndarray, previous: np.ndarray | None) -> np.ndarray:
    """Inverse of :func:`xor_deltas`: frame i is the XOR of previous and deltas 0..i."""
    frames = np.bitwise_xor.accumulate(deltas, axis=0)
    if previous is not None:
        frames ^= previous
    return frames


def gunzip_member(data: bytes) -> bytes:
    """Decompress exactly one complete gzip member; anything else is a ValueError."""
    stream = isal_zlib.decompressobj(wbits=_GZIP_WBITS)
    try:
        out = stream.decompress(data)
    except isal_zlib.error as exc:
        raise ValueError(f"delta-gzip payload is not valid gzip: {exc}") from exc
    if not stream.eof or stream.unused_data:
        raise ValueError("delta-gzip payload must be exactly one complete gzip member")
    return out


class DeltaGzipEncoder(ChunkEncoder):
    content_type = "application/x-raw-rgb-delta-gzip"
    encoding = "delta-gzip"

    def __init__(self, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, executor: Executor | None = None):
        super().__init__(max_message_bytes=max_message_bytes, executor=executor)
        self.reset()

    def reset(self) -> None:
        self._reference: np.ndarray | None = None
        self._event_id: int | None = None

    def _encode(self, frames: np.ndarray, budget: int, *, chunk_index: int, event_id: int | None) -> list[BatchPart]:
        key = (
            chunk_index == 0
            or self._reference is None
            or event_id != self._event_id
            or self._reference.shape != frames.shape[1:]
        )
        flat = frames.reshape(len(frames), -1)
        frame_bytes = flat.shape[1]
        reference = None if key else self._reference.reshape(-1)

        def encode(batch: range) -> BatchPart:
            previous = flat[batch.start - 1] if batch.start else reference
            deltas = xor_deltas(flat[batch.start : batch.stop], previous)
            fields = dict(channels=CHANNELS, bytes_per_frame=frame_bytes, raw_size=deltas.nbytes)
            if previous is not None:
                fields["delta_reference"] = PREVIOUS_FRAME
            return BatchPart(isal_zlib.compress(deltas, GZIP_LEVEL, wbits=_GZIP_WBITS), len(batch), fields)

        # Each batch needs only original frames, so batches compress in parallel.
        parts = self._map(encode, split_uniform(len(flat), lambda k: gzip_bound(k * frame_bytes), budget))
        # Copied: the caller may reuse its frame buffer for the next chunk.
        self._reference = frames[-1].copy()
        self._event_id = event_id
        return parts


def decode_delta(batch: FrameBatch, previous: np.ndarray | None) -> np.ndarray:
    """Frames of a delta-gzip batch, given the last frame decoded before it (None at the start)."""
    frame_bytes = checked_frame_bytes(batch)
    raw = gunzip_member(batch.payload)
    if len(raw) != frame_bytes * batch.num_frames:
        raise ValueError(
            f"delta-gzip payload inflates to {len(raw)} bytes, expected bytes_per_frame x num_frames = "
            f"{frame_bytes} x {batch.num_frames}"
        )
    if batch.delta_reference not in (None, PREVIOUS_FRAME):
        raise ValueError(f"unknown delta_reference={batch.delta_reference!r}")
    if batch.delta_reference is not None:
        if previous is None:
            raise ValueError("delta-gzip batch is a delta (delta_reference set) but no previous frame was decoded")
        if previous.size != frame_bytes:
            raise ValueError(f"previous frame has {previous.size} bytes, this batch's frames have {frame_bytes}")
    deltas = np.frombuffer(raw, np.uint8).reshape(batch.num_frames, frame_bytes)
    reference = previous.reshape(-1) if batch.delta_reference is not None else None
    return undo_deltas(deltas, reference).reshape(batch.num_frames, batch.height, batch.width, CHANNELS)
