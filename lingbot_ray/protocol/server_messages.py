"""Messages the server sends: ``frame_batch``, ``chunk_stats`` and ``error`` (nothing else).

Every field that is an integer is declared non-negative and below 2**32 so that the encoded
MessagePack stays inside what the reference WebUI's minimal decoder reads (see docs/PROTOCOL.md,
"MessagePack constraints"). Lists are bounded at 15 elements.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

U32 = Annotated[int, msgspec.Meta(ge=0, lt=2**32)]
MAX_WIRE_ARRAY = 15
MAX_WIRE_STR_BYTES = 65535


class FrameBatch(msgspec.Struct, tag_field="type", tag="frame_batch", omit_defaults=True, kw_only=True):
    """One batch of a chunk's frames. ``num_frames`` counts the frames in *this* batch.

    Format-specific fields default to ``None`` and are omitted from the wire when unset, so a
    ``raw`` batch carries no ``payload_lengths`` and a still-image batch no ``bytes_per_frame``.
    """

    request_id: str
    chunk_index: U32
    content_type: str
    encoding: str
    num_frames: U32
    width: U32
    height: U32
    total_size: U32
    frame_batch_index: U32
    num_frame_batches: U32
    is_final_frame_batch: bool
    payload: bytes
    event_id: U32 | None = None
    # raw and delta-gzip
    format: str | None = None
    channels: U32 | None = None
    bytes_per_frame: U32 | None = None
    raw_size: U32 | None = None
    delta_reference: str | None = None
    # webp / jpeg stills
    source_width: U32 | None = None
    source_height: U32 | None = None
    preview_width: U32 | None = None
    preview_height: U32 | None = None
    payload_lengths: Annotated[list[U32], msgspec.Meta(max_length=MAX_WIRE_ARRAY)] | None = None
    # our own: effective playback fps of these frames (fps · 2^exp with interpolation)
    fps: float | None = None


class ChunkStats(msgspec.Struct, tag_field="type", tag="chunk_stats", kw_only=True):
    """Per-chunk timings and transport figures. All ``*_ms`` are rounded non-negative integers.

    ``event_id`` is always present (nil when no event has been sampled yet). Fields after
    ``chunk_total_ms`` are this project's own additions; reference clients ignore them.
    """

    session_id: str
    request_id: str
    chunk_index: U32
    event_id: U32 | None
    num_frames: U32
    num_batches: U32
    content_type: str
    raw_bytes: U32
    ws_payload_bytes: U32
    request_prepare_ms: U32
    scheduler_forward_ms: U32
    pace_wait_ms: U32
    header_write_ms: U32
    raw_payload_build_ms: U32
    raw_write_ms: U32
    ws_write_ms: U32
    chunk_total_ms: U32
    # per-stage figures of the pipelined graph
    text_encoder_ms: U32 = 0
    dit_ms: U32 = 0
    vae_ms: U32 = 0
    postprocess_ms: U32 = 0
    queue_wait_ms: U32 = 0
    width: U32 = 0
    height: U32 = 0
    fps: float = 0.0
    replica_id: str = ""
    # denoising steps each block of the chunk ran: the init's num_inference_steps, which this
    # server honours where the reference server ignores it (docs/PROTOCOL.md, "init")
    num_inference_steps: U32 | None = None


class ErrorMessage(msgspec.Struct, tag_field="type", tag="error", omit_defaults=True, kw_only=True):
    """``{"type": "error", "content": ...}``; ``detail`` (ours) names the offending field and value."""

    content: str
    detail: str | None = None


ServerMessage = FrameBatch | ChunkStats | ErrorMessage

_encoder = msgspec.msgpack.Encoder()


def _clip_utf8(text: str, limit: int = MAX_WIRE_STR_BYTES) -> str:
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return text
    return raw[:limit].decode("utf-8", errors="ignore")


def _check_wire_fields(message: ServerMessage) -> None:
    """Structs are not validated on construction: enforce the WebUI's subset before encoding."""
    for name in message.__struct_fields__:
        value = getattr(message, name)
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int):
            values = [value]
        elif isinstance(value, list):
            if len(value) > MAX_WIRE_ARRAY:
                raise ValueError(f"{message.__class__.__name__}.{name} has {len(value)} elements (max {MAX_WIRE_ARRAY})")
            values = value
        else:
            continue
        for v in values:
            if not isinstance(v, int) or not 0 <= v < 2**32:
                raise ValueError(f"{message.__class__.__name__}.{name}={v!r} is not an integer in [0, 2**32)")


def encode_server_message(message: ServerMessage) -> bytes:
    """Encode one server message as a MessagePack map (one binary WebSocket frame)."""
    _check_wire_fields(message)
    if isinstance(message, ErrorMessage):
        message = ErrorMessage(
            content=_clip_utf8(message.content),
            detail=None if message.detail is None else _clip_utf8(message.detail),
        )
    return _encoder.encode(message)
