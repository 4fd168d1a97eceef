"""The post-processing stage: RIFE interpolation, then Real-ESRGAN upscaling, per session.

Sticky like the DiT and the VAE: RIFE pairs a chunk's first frame with the previous chunk's last
(:mod:`lingbot_ray.models.postprocess` has the frame accounting). Weights are loaded once per file and
shared by every session that names the same file; each session picks its own models and factors
through its :class:`~.messages.PostOptions`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch

from .hosts import SessionHost, timed
from .messages import FrameChunk, PostOptions

logger = logging.getLogger(__name__)


class PostStage:
    """The weights, by file, on one device."""

    def __init__(self, *, device: str | torch.device = "cpu", tile: int | None = None):
        self.device = torch.device(device)
        self.tile = tile
        self._models: dict[tuple[str, str], Any] = {}

    def _model(self, kind: str, path: str):
        from ..models.realesrgan import load_realesrgan
        from ..models.rife import load_rife

        key = (kind, os.path.realpath(path))
        if key not in self._models:
            loader = load_rife if kind == "rife" else load_realesrgan
            self._models[key] = loader(path, device=self.device)
            logger.info("post-processing: loaded %s weights from %s", kind, path)
        return self._models[key]

    def processor(self, options: PostOptions):
        """A processor with the models ``options`` ask for (loaded on first use)."""
        from ..models.postprocess import PostProcessor

        rife = self._model("rife", options.rife_path) if options.exp else None
        esrgan = self._model("esrgan", options.esrgan_path) if options.upscale != 1 else None
        return PostProcessor(rife, esrgan, tile=self.tile)


class PostSessionState:
    """One session's post-processing: its processor and options, and RIFE's previous frame."""

    def __init__(self, processor, options: PostOptions):
        from ..models.postprocess import PostProcessSession

        self.processor, self.options, self.stream = processor, options, PostProcessSession()

    def reset(self) -> None:
        self.stream.reset()

    def release(self) -> None:
        self.stream.release()


class PostHost(SessionHost[PostSessionState]):
    STAGE = "post-process"

    def __init__(self, stage: PostStage):
        super().__init__()
        self.stage = stage

    def start_session(self, sid: str, options: PostOptions) -> None:
        self.open_session(sid)
        self.sessions[sid] = PostSessionState(self.stage.processor(options), options)

    def process(self, sid: str, chunk: FrameChunk) -> FrameChunk:
        state = self.session(sid)
        options = state.options
        frames, ms = timed(
            self.stage.device,
            lambda: state.processor.process(
                state.stream, chunk.frames, exp=options.exp, scale=options.flow_scale, upscale=options.upscale
            ),
        )
        return dataclasses.replace(chunk, frames=frames, timings=dataclasses.replace(chunk.timings, postprocess_ms=ms))
