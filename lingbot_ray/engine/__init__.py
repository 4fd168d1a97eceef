"""The realtime engine: session state and the per-chunk step, in-process and without Ray.

Three stages (text, DiT, VAE) usable on their own — the Ray deployments wrap one each — and
:class:`RealtimeEngine`, which composes them for tests, benchmarks and notebooks.
"""

from .engine import RealtimeEngine, SessionState
from .errors import EngineError, PositionLimitReached, SessionClosedError
from .sampler import DMDSampler, DMDSchedule
from .session import ChunkOutput, ModelGeometry, ResolvedSpec, SessionSpec
from .stages import DiTSessionState, DiTStage, TextStage, VAESessionState, VAEStage, read_geometry

__all__ = [
    "ChunkOutput",
    "DMDSampler",
    "DMDSchedule",
    "DiTSessionState",
    "DiTStage",
    "EngineError",
    "ModelGeometry",
    "PositionLimitReached",
    "RealtimeEngine",
    "ResolvedSpec",
    "SessionClosedError",
    "SessionSpec",
    "SessionState",
    "TextStage",
    "VAESessionState",
    "VAEStage",
    "read_geometry",
]
