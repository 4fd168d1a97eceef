"""Typed engine errors. Bad input is a ``ValueError`` naming the field and value; these are the rest."""

from __future__ import annotations


class EngineError(RuntimeError):
    """Base of the engine's own failures (not input validation)."""


class SessionClosedError(EngineError):
    """A session (or one stage's part of it) was used after ``release``/``close``."""


class PositionLimitReached(EngineError):
    """The session's latent frame index reached the model's RoPE temporal range.

    The temporal RoPE index is the absolute latent frame index, so a session can only run for
    ``rope_max_seq_len`` latent frames (about 256 s at 16 fps for LingBot World fast). The session
    must end; start a new one to continue.
    """

    def __init__(self, next_frame: int, num_frames: int, limit: int):
        self.next_frame = next_frame
        self.num_frames = num_frames
        self.limit = limit
        super().__init__(
            f"session reached the model's position limit: latent frames {next_frame}.."
            f"{next_frame + num_frames - 1} exceed rope_max_seq_len={limit}; start a new session"
        )
