"""The realtime engine: session state, the stages and the stage chain, in-process and without Ray.

The stages (text, DiT, VAE, post-processing) are usable on their own; their hosts keep sessions by
id and speak the chain's typed messages (:mod:`.messages`); :class:`RealtimeEngine` runs the chain
in-process, the Ray deployments wrap one host each.

Names load on first use: the torch-free parts (:mod:`.messages`, :mod:`.session`, :mod:`.chain`)
can be imported by a process that never loads a model (the ingress).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ChunkOutput": "session",
    "ResolvedSpec": "session",
    "SessionSpec": "session",
    "ModelGeometry": "session",
    "ChunkRequest": "messages",
    "DiTChunk": "messages",
    "FrameChunk": "messages",
    "PostOptions": "messages",
    "PromptEmbeds": "messages",
    "SessionOpened": "messages",
    "StageTimings": "messages",
    "StageChain": "chain",
    "EngineError": "errors",
    "PositionLimitReached": "errors",
    "SessionClosedError": "errors",
    "DMDSampler": "sampler",
    "DMDSchedule": "sampler",
    "DiTSessionState": "stages",
    "DiTStage": "stages",
    "TextStage": "stages",
    "VAESessionState": "stages",
    "VAEStage": "stages",
    "DiTHost": "hosts",
    "VAEHost": "hosts",
    "PostHost": "postprocess",
    "PostStage": "postprocess",
    "RealtimeEngine": "engine",
    "SessionState": "engine",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
