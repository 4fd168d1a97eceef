"""``webp`` / ``jpeg``: one independent still image per frame, concatenated, for previews.

Frames may be downscaled to a preview width (bicubic, aspect kept). Frames encode in parallel on
the encoder's thread pool; a chunk is split into batches once the encoded sizes are known.
"""

from __future__ import annotations

import abc
import io
from concurrent.futures import Executor
from typing import ClassVar

import numpy as np
from PIL import Image

from lingbot_ray.protocol.server_messages import FrameBatch

from .batching import DEFAULT_MAX_MESSAGE_BYTES, BatchPart, split_by_size
from .encoder import ChunkEncoder


def preview_size(width: int, height: int, max_width: int | None) -> tuple[int, int]:
    """(width, height) of a frame's preview: narrowed to ``max_width`` only when wider."""
    if max_width is None or width <= max_width:
        return width, height
    # Nearest integer height (halves round up), in integer arithmetic so no float error decides it.
    return max_width, max(1, (2 * height * max_width + width) // (2 * width))


class StillEncoder(ChunkEncoder):
    """Shared body of the still-image formats; subclasses say how one image is saved."""

    pil_format: ClassVar[str]
    default_quality: ClassVar[int]

    def __init__(
        self,
        *,
        quality: int | None = None,
        preview_max_width: int | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        executor: Executor | None = None,
    ):
        super().__init__(max_message_bytes=max_message_bytes, executor=executor)
        quality = self.default_quality if quality is None else quality
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
            raise ValueError(f"quality must be an integer in 1..100, got {quality!r}")
        if preview_max_width is not None and (
            isinstance(preview_max_width, bool) or not isinstance(preview_max_width, int) or preview_max_width < 1
        ):
            raise ValueError(f"preview_max_width must be a positive integer, got {preview_max_width!r}")
        self.quality = quality
        self.preview_max_width = preview_max_width

    def _encode(self, frames: np.ndarray, budget: int, *, chunk_index: int, event_id: int | None) -> list[BatchPart]:
        height, width = frames.shape[1:3]
        size = preview_size(width, height, self.preview_max_width)

        def encode(frame: np.ndarray) -> bytes:
            image = Image.fromarray(frame)
            if image.size != size:
                image = image.resize(size, Image.Resampling.BICUBIC)
            buffer = io.BytesIO()
            self._save(image, buffer)
            return buffer.getvalue()

        images = self._map(encode, frames)
        fields = dict(source_width=width, source_height=height, preview_width=size[0], preview_height=size[1])
        return [
            BatchPart(
                b"".join(images[batch.start : batch.stop]),
                len(batch),
                dict(fields, payload_lengths=[len(image) for image in images[batch.start : batch.stop]]),
            )
            for batch in split_by_size([len(image) for image in images], budget)
        ]

    @abc.abstractmethod
    def _save(self, image: Image.Image, buffer: io.BytesIO) -> None:
        """Write ``image`` to ``buffer`` in this format at ``self.quality``."""


class WebPEncoder(StillEncoder):
    content_type = "image/webp"
    encoding = "webp"
    pil_format = "WEBP"
    default_quality = 90

    def __init__(self, *, method: int = 0, **kwargs):
        """``method`` is libwebp's effort (0 fastest … 6 smallest); see the transport benchmark."""
        super().__init__(**kwargs)
        if not 0 <= method <= 6:
            raise ValueError(f"webp method must be in 0..6, got {method!r}")
        self.method = method

    def _save(self, image: Image.Image, buffer: io.BytesIO) -> None:
        image.save(buffer, format=self.pil_format, quality=self.quality, method=self.method)


class JpegEncoder(StillEncoder):
    content_type = "image/jpeg"
    encoding = "jpeg"
    pil_format = "JPEG"
    default_quality = 95

    def _save(self, image: Image.Image, buffer: io.BytesIO) -> None:
        # subsampling=0 is 4:4:4: full-resolution chroma, as the protocol requires.
        image.save(buffer, format=self.pil_format, quality=self.quality, subsampling=0)


_PIL_FORMATS = {WebPEncoder.encoding: WebPEncoder.pil_format, JpegEncoder.encoding: JpegEncoder.pil_format}


def decode_stills(batch: FrameBatch) -> np.ndarray:
    """Frames of a webp/jpeg batch as uint8 [n, preview_height, preview_width, 3]."""
    lengths = batch.payload_lengths
    if lengths is None or len(lengths) != batch.num_frames:
        raise ValueError(f"{batch.encoding} batch has payload_lengths={lengths!r} for num_frames={batch.num_frames}")
    if sum(lengths) != len(batch.payload):
        raise ValueError(f"payload_lengths sum to {sum(lengths)} but the payload has {len(batch.payload)} bytes")
    shape = (batch.preview_height, batch.preview_width, 3)
    frames = np.empty((batch.num_frames, *shape), np.uint8)
    view, offset, formats = memoryview(batch.payload), 0, [_PIL_FORMATS[batch.encoding]]
    for index, length in enumerate(lengths):
        try:
            with Image.open(io.BytesIO(view[offset : offset + length]), formats=formats) as image:
                pixels = np.asarray(image.convert("RGB"))
        except OSError as exc:
            raise ValueError(f"{batch.encoding} frame {index} does not decode: {exc}") from exc
        if pixels.shape != shape:
            raise ValueError(f"{batch.encoding} frame {index} has shape {pixels.shape}, expected {shape}")
        frames[index] = pixels
        offset += length
    return frames
