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


class CloseCode(enum.IntEnum):
    NORMAL = 1000
    POLICY_VIOLATION = 1008
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013


class ProtocolError(ValueError):
    """A client message failed validation. ``content`` is the exact wire string."""

    content = INVALID_INIT

    def __init__(self, field: str, value: object, reason: str):
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"{field}={_short_repr(value)}: {reason}")


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


@dataclass(frozen=True)
class Outcome:
    """What the server says and does for an exception: an error message, and maybe a close."""

    error: ErrorMessage | None
    close_code: CloseCode | None
    close_reason: str = ""


def _short_repr(value: object, limit: int = 80) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    if isinstance(exc, AuthError):
        message = f"unauthorized: {exc}"
        return Outcome(ErrorMessage(content=message), CloseCode.POLICY_VIOLATION, _clip_reason(message))
    lines = str(exc).strip().splitlines()
    first_line = lines[0] if lines else type(exc).__name__
    message = f"error during generate loop: {first_line}"
    return Outcome(ErrorMessage(content=message), CloseCode.INTERNAL_ERROR, _clip_reason(message))
