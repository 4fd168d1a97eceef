"""What a session asks for (:class:`SessionSpec`) and what one chunk returns (:class:`ChunkOutput`),
both checked against the served model's :class:`~lingbot_ray.checkpoint.ModelGeometry`.

A spec is plain data (it travels between Ray stages); :meth:`SessionSpec.resolve` checks it against
the served model and fills the model defaults, returning a :class:`ResolvedSpec` the stages use.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from ..checkpoint import ModelGeometry, ServingDefaults
from .messages import StageTimings

Quality = Literal["lossless", "high"]
_QUALITIES = ("lossless", "high")
_MAX_SEED = 2**64 - 1


@dataclass(frozen=True, eq=False)  # eq would compare images element-wise
class SessionSpec:
    """One session's fixed parameters. ``image`` is the first frame, uint8 [height, width, 3] RGB,
    already resized to the session size. ``sink_size``/``window_frames`` ``None`` take the model's
    config. ``guidance_scale <= 1`` means no classifier-free guidance (one branch), as in the
    reference system; above 1 both branches run. ``quality``: ``"lossless"`` decodes in fp32,
    ``"high"`` in bf16.
    """

    prompt: str
    image: np.ndarray = field(repr=False)
    width: int
    height: int
    num_frames: int = ServingDefaults.num_frames
    seed: int = 42
    num_inference_steps: int = len(ServingDefaults.timestep_indices)
    guidance_scale: float = 1.0
    negative_prompt: str | None = None
    sink_size: int | None = None
    window_frames: int | None = None
    quality: Quality = "lossless"

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError(f"prompt={self.prompt!r}: must be a non-empty string")
        for name in ("width", "height", "num_frames", "num_inference_steps"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name}={value!r}: must be an integer >= 1")
        if not _is_int(self.seed) or not 0 <= self.seed <= _MAX_SEED:
            raise ValueError(f"seed={self.seed!r}: must be an integer in [0, 2**64)")
        if (
            isinstance(self.guidance_scale, bool)
            or not isinstance(self.guidance_scale, (int, float))
            or not math.isfinite(self.guidance_scale)
            or self.guidance_scale < 0
        ):
            raise ValueError(f"guidance_scale={self.guidance_scale!r}: must be a finite number >= 0")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise ValueError(f"negative_prompt={self.negative_prompt!r}: must be a string or None")
        if self.sink_size is not None and (not _is_int(self.sink_size) or self.sink_size < 0):
            raise ValueError(f"sink_size={self.sink_size!r}: must be an integer >= 0 or None")
        if self.window_frames is not None and (
            not _is_int(self.window_frames) or self.window_frames < 1
        ):
            raise ValueError(f"window_frames={self.window_frames!r}: must be an integer >= 1 or None")
        if self.quality not in _QUALITIES:
            raise ValueError(f"quality={self.quality!r}: must be one of {_QUALITIES}")
        image = self.image
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3:
            raise ValueError(f"image={_describe(image)}: must be a uint8 numpy array [H, W, 3]")
        if image.shape != (self.height, self.width, 3):
            raise ValueError(
                f"image={_describe(image)}: shape must be (height, width, 3) = "
                f"({self.height}, {self.width}, 3)"
            )

    @property
    def use_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    def resolve(self, geometry: ModelGeometry) -> ResolvedSpec:
        """Check the spec against the served model and fill the model defaults."""
        multiple = geometry.size_multiple
        for name in ("width", "height"):
            value = getattr(self, name)
            if value % multiple:
                raise ValueError(f"{name}={value!r}: must be a multiple of {multiple}")
        sink = geometry.default_sink_size if self.sink_size is None else self.sink_size
        window = geometry.default_window_frames if self.window_frames is None else self.window_frames
        block = geometry.num_frames_per_block
        if sink + block > window:
            raise ValueError(
                f"window_frames={window!r}: must be at least sink_size ({sink}) + frames per block "
                f"({block}) = {sink + block}"
            )
        return ResolvedSpec(
            spec=self,
            sink_size=sink,
            window_frames=window,
            blocks_per_chunk=geometry.blocks_per_chunk(self.num_frames),
            geometry=geometry,
        )


@dataclass(frozen=True)
class ResolvedSpec:
    """A spec checked against one model, with the defaults filled in."""

    spec: SessionSpec
    sink_size: int
    window_frames: int
    blocks_per_chunk: int
    geometry: ModelGeometry

    @property
    def latent_frames_per_chunk(self) -> int:
        return self.blocks_per_chunk * self.geometry.num_frames_per_block

    @property
    def latent_height(self) -> int:
        return self.spec.height // self.geometry.vae_scale_spatial

    @property
    def latent_width(self) -> int:
        return self.spec.width // self.geometry.vae_scale_spatial


@dataclass
class ChunkOutput:
    """One generated chunk of :meth:`RealtimeEngine.step`. ``frames``: uint8 [N, H, W, 3] RGB, N =
    1+4(F-1) for chunk 0 and 4F after (times the interpolation factor with post-processing), F =
    ``num_latent_frames``. ``timings``: each stage's milliseconds."""

    frames: np.ndarray
    chunk_index: int
    event_id: int | None
    timings: StageTimings
    num_latent_frames: int
    start_frame: int

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def timings_ms(self) -> dict[str, float]:
        """The timings by stage name, plus their ``total``."""
        return {**dataclasses.asdict(self.timings), "total_ms": self.timings.total_ms}


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"<ndarray shape={value.shape} dtype={value.dtype}>"
    return f"<{type(value).__name__}>"
