"""Errors a session can meet, and the one place that maps them to wire errors and close codes.

The wire strings are the reference system's (``invalid generate request``, ``invalid event``, …) so
its clients keep working; the offending field and value travel in our own ``detail`` field and in
the server log.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .server_messages import ErrorMessage

INVALID_INIT = "invalid generate request"
INVALID_EVENT = "invalid event"
GENERATION_COMPLETE = "generation complete"
_MAX_CLOSE_REASON_BYTES = 123  # RFC 6455: a close frame's payload is at most 125 bytes
_MAX_REASON_CHARS = 200


class CloseCode(enum.IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013


class ProtocolError(ValueError):
    """A client message failed validation. ``content`` is the exact wire string."""

    content = INVALID_INIT

    def __init__(self, field: str, value: object, reason: str):
        self.field = field
        self.value = value
        self.reason = clip(reason, _MAX_REASON_CHARS)  # validators quote the value: keep it short
        super().__init__(f"{clip(field, 80)}={_short_repr(value)}: {self.reason}")


class InvalidInit(ProtocolError):
    content = INVALID_INIT


class InvalidEvent(ProtocolError):
    content = INVALID_EVENT


class CapacityError(RuntimeError):
    """No group has room for a new session (close 1013, try again later)."""


class AuthError(RuntimeError):
    """Missing or wrong API key (close 1008)."""


class SessionLost(RuntimeError):
    """The stage holding the session's state died or forgot it."""


class InitTimeout(RuntimeError):
    """No valid ``init`` arrived in time (close 1008: the client broke the protocol's first step)."""


class MessageTooBig(RuntimeError):
    """A client message over the configured size (close 1009)."""


class ServerShutdown(RuntimeError):
    """The server is going away (a rollout, a downscale, a stop): close 1001."""


@dataclass(frozen=True)
class Outcome:
    """What the server says and does for an exception: an error message, and maybe a close."""

    error: ErrorMessage | None
    close_code: CloseCode | None
    close_reason: str = ""


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, marked when cut: what a client sent never reaches a
    reply or a log line at full length."""
    return text if len(text) <= limit else f"{text[: limit - 20]}... <{len(text)} chars>"


_PLAIN = (str, int, float, bool, type(None), list, dict, tuple)


def _short_repr(value: object, limit: int = 80) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if not isinstance(value, _PLAIN):  # e.g. a MessagePack extension: its repr shows heap addresses
        return f"<{type(value).__name__}>"
    if isinstance(value, (list, dict, tuple)) and len(value) > 16:
        return f"<{type(value).__name__} of {len(value)}>"
    try:
        text = repr(value)
    except RecursionError:
        return f"<nested {type(value).__name__}>"
    return clip(text, limit)


def _clip_reason(text: str) -> str:
    raw = text.encode("utf-8")[:_MAX_CLOSE_REASON_BYTES]
    return raw.decode("utf-8", errors="ignore")


def outcome_for(exc: BaseException | None) -> Outcome:
    """Map a session's end (``None`` = generation complete) or failure to what the client sees.

    Protocol errors keep the socket open; everything else closes it with the matching code.
    """
    if exc is None:
        return Outcome(None, CloseCode.NORMAL, GENERATION_COMPLETE)
    if isinstance(exc, ProtocolError):
        return Outcome(ErrorMessage(content=exc.content, detail=str(exc)), None)
    if isinstance(exc, CapacityError):
        message = f"no capacity: {exc}"
        return Outcome(ErrorMessage(content=message), CloseCode.TRY_AGAIN_LATER, _clip_reason(message))
    closing = {
        AuthError: ("unauthorized", CloseCode.POLICY_VIOLATION),
        InitTimeout: ("init timeout", CloseCode.POLICY_VIOLATION),
        MessageTooBig: ("message too big", CloseCode.MESSAGE_TOO_BIG),
        ServerShutdown: ("server shutting down", CloseCode.GOING_AWAY),
    }
    for kind, (prefix, code) in closing.items():
        if isinstance(exc, kind):
            message = f"{prefix}: {exc}"
            return Outcome(ErrorMessage(content=message), code, _clip_reason(message))
    lines = str(exc).strip().splitlines()
    first_line = clip(lines[0], _MAX_REASON_CHARS) if lines else type(exc).__name__
    message = f"error during generate loop: {first_line}"
    return Outcome(ErrorMessage(content=message), CloseCode.INTERNAL_ERROR, _clip_reason(message))
