"""Client-side decoding of ``frame_batch`` messages back into RGB frames (tests, harnesses, tools)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec
import numpy as np

from lingbot_ray.protocol.server_messages import FrameBatch

from .delta import DeltaGzipEncoder, decode_delta
from .raw import RawEncoder, decode_raw
from .stills import JpegEncoder, WebPEncoder, decode_stills


class FrameDecoder:
    """Decodes one session's frame batches, in arrival order.

    Stateful like the stream it reads: a delta-gzip batch is decoded against the last frame of the
    batch before it. Raw and delta frames come back exact; stills come back at preview size.
    """

    def __init__(self) -> None:
        self._reference: np.ndarray | None = None

    def reset(self) -> None:
        """Forget the delta reference (a new stream starts with a key frame)."""
        self._reference = None

    def decode(self, batch: FrameBatch | Mapping[str, Any]) -> np.ndarray:
        """Frames of ``batch`` (a FrameBatch or the decoded MessagePack map) as uint8 [n, H, W, 3]."""
        if not isinstance(batch, FrameBatch):
            batch = msgspec.convert(batch, FrameBatch)
        if batch.encoding == RawEncoder.encoding:
            return decode_raw(batch)
        if batch.encoding == DeltaGzipEncoder.encoding:
            frames = decode_delta(batch, self._reference)
            self._reference = frames[-1]
            return frames
        if batch.encoding in (WebPEncoder.encoding, JpegEncoder.encoding):
            return decode_stills(batch)
        raise ValueError(f"unknown frame_batch encoding {batch.encoding!r}")
