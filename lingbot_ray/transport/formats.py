"""Choosing the encoder for an init's ``realtime_output_format``."""

from __future__ import annotations

from concurrent.futures import Executor

from .batching import DEFAULT_MAX_MESSAGE_BYTES
from .delta import DeltaGzipEncoder
from .encoder import ChunkEncoder
from .raw import RawEncoder
from .stills import JpegEncoder, WebPEncoder

# None is the protocol's default (the field absent); "delta-gzip" names the same format explicitly.
OUTPUT_FORMATS = (None, "delta-gzip", "raw", "webp", "jpeg")


def make_encoder(
    fmt: str | None,
    *,
    quality: int | None = None,
    preview_max_width: int | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    executor: Executor | None = None,
    webp_method: int = 0,
) -> ChunkEncoder:
    """A fresh per-session encoder for ``fmt`` (``realtime_output_format``; None = delta-gzip).

    ``quality`` (``output_compression``, default webp 90 / jpeg 95) and ``preview_max_width`` apply
    to webp/jpeg, ``webp_method`` (libwebp effort, 0 = fastest) to webp; raw and delta-gzip ignore them.
    """
    common = dict(max_message_bytes=max_message_bytes, executor=executor)
    if fmt is None or fmt == DeltaGzipEncoder.encoding:
        return DeltaGzipEncoder(**common)
    if fmt == RawEncoder.encoding:
        return RawEncoder(**common)
    if fmt == WebPEncoder.encoding:
        return WebPEncoder(quality=quality, preview_max_width=preview_max_width, method=webp_method, **common)
    if fmt == JpegEncoder.encoding:
        return JpegEncoder(quality=quality, preview_max_width=preview_max_width, **common)
    raise ValueError(f"realtime_output_format must be one of {OUTPUT_FORMATS}, got {fmt!r}")
