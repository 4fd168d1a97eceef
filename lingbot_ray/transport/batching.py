"""Splitting a chunk's frames into ``frame_batch`` messages that respect the wire limits.

Two limits apply (docs/PROTOCOL.md, "Server messages"): an encoded message must stay under the WebSocket
message cap (uvicorn refuses anything over 16 MiB, proxies often less), and a MessagePack array may
hold at most 15 elements. Still-image batches carry one ``payload_lengths`` entry per frame, so every
format caps a batch at 15 frames.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from lingbot_ray.protocol.server_messages import MAX_WIRE_ARRAY, FrameBatch

logger = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 8 * 2**20
MAX_FRAMES_PER_BATCH = MAX_WIRE_ARRAY
# Every frame_batch field but the payload and request_id encodes to under 550 bytes, even with all
# optional fields set at their widest; the rest is margin for fields added later.
HEADER_ROOM_BYTES = 1024


class BatchPart(NamedTuple):
    """One batch as a format encoder produced it: payload, frame count, format-specific fields."""

    payload: bytes
    num_frames: int
    fields: dict[str, Any]


def payload_budget(max_message_bytes: int, request_id: str) -> int:
    """Payload bytes one message may carry once its header is accounted for."""
    budget = max_message_bytes - HEADER_ROOM_BYTES - len(request_id.encode("utf-8"))
    if budget <= 0:
        raise ValueError(
            f"max_message_bytes={max_message_bytes} leaves no room for a payload after "
            f"{max_message_bytes - budget} header bytes"
        )
    return budget


def split_uniform(num_frames: int, payload_bound: Callable[[int], int], budget: int) -> list[range]:
    """Split frames of one fixed size into as few batches as fit, of near-equal length.

    ``payload_bound(k)`` is the most payload bytes ``k`` frames can take. Near-equal batches keep
    the send pace even and give parallel compression equal shares of work.
    """
    per_batch = min(num_frames, MAX_FRAMES_PER_BATCH)
    while per_batch and payload_bound(per_batch) > budget:
        per_batch -= 1
    if per_batch == 0:
        raise ValueError(
            f"one frame needs up to {payload_bound(1)} payload bytes but a frame_batch may carry "
            f"only {budget} (max_message_bytes minus header room)"
        )
    num_batches = -(-num_frames // per_batch)
    base, extra = divmod(num_frames, num_batches)
    ranges, start = [], 0
    for index in range(num_batches):
        stop = start + base + (index < extra)
        ranges.append(range(start, stop))
        start = stop
    return ranges


def split_by_size(sizes: Sequence[int], budget: int) -> list[range]:
    """Greedily pack already-encoded frames (of ``sizes`` bytes) into batches within ``budget``."""
    ranges, start, total = [], 0, 0
    for index, size in enumerate(sizes):
        if size > budget:
            raise ValueError(
                f"frame {index} encodes to {size} bytes but a frame_batch may carry only {budget} "
                f"(max_message_bytes minus header room)"
            )
        if index - start == MAX_FRAMES_PER_BATCH or total + size > budget:
            ranges.append(range(start, index))
            start, total = index, 0
        total += size
    ranges.append(range(start, len(sizes)))
    return ranges


def assemble(
    parts: Sequence[BatchPart],
    *,
    content_type: str,
    encoding: str,
    request_id: str,
    chunk_index: int,
    event_id: int | None,
    width: int,
    height: int,
    fps: float | None,
) -> list[FrameBatch]:
    """Wrap encoded parts in ``FrameBatch`` messages numbered within their chunk."""
    if len(parts) > 1:
        logger.debug("chunk %d: %s split into %d frame batches", chunk_index, encoding, len(parts))
    return [
        FrameBatch(
            request_id=request_id,
            chunk_index=chunk_index,
            content_type=content_type,
            encoding=encoding,
            num_frames=part.num_frames,
            width=width,
            height=height,
            total_size=len(part.payload),
            frame_batch_index=index,
            num_frame_batches=len(parts),
            is_final_frame_batch=index == len(parts) - 1,
            payload=part.payload,
            event_id=event_id,
            fps=None if fps is None else float(fps),
            **part.fields,
        )
        for index, part in enumerate(parts)
    ]
