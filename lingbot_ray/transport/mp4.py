"""H.264 in an MP4 container through PyAV: ``lingbot-ray record`` writes a stream to a file with it,
and ``POST /v1/videos`` answers a clip with it (to a spooled temporary file)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import numpy as np


def fps_fraction(fps: float) -> Fraction:
    """A frame rate as the time base a container takes (29.97 → 30000/1001)."""
    return Fraction(fps).limit_denominator(1001)


class Mp4Writer:
    """Opened on the first frames (their size and fps); ``target`` is a path or a seekable binary
    file object such as :class:`io.BytesIO`. ``lossless``: RGB H.264 (libx264rgb) at crf 0, whose
    frames decode bit for bit; else yuv420p at ``crf``, what every player takes."""

    def __init__(self, target: Path | str | BinaryIO, crf: int = 18, lossless: bool = False) -> None:
        self.target, self.crf, self.lossless = target, crf, lossless
        self._container = self._stream = None
        self.frames = 0

    def write(self, frames: np.ndarray, fps: float) -> None:
        import av

        if self._container is None:
            height, width = frames.shape[1:3]
            if width % 2 or height % 2:
                raise ValueError(f"H.264 needs even frame sizes, got {width}x{height}")
            target = str(self.target) if isinstance(self.target, (str, Path)) else self.target
            self._container = av.open(target, mode="w", format="mp4")
            codec, crf, pix_fmt = ("libx264rgb", 0, "rgb24") if self.lossless else ("libx264", self.crf, "yuv420p")
            self._stream = self._container.add_stream(codec, rate=fps_fraction(fps), options={"crf": str(crf)})
            self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, pix_fmt
        for frame in frames:
            for packet in self._stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                self._container.mux(packet)
            self.frames += 1

    def close(self) -> None:
        if self._container is not None:
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._container.close()
            self._container = None
