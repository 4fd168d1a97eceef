"""The camera action vocabulary: one ordered table of tokens and what each does to the camera.

Everything that knows an action token reads it from :data:`ACTIONS`: protocol validation, the
condition queue, the camera integration (:class:`lingbot_ray.control.camera.CameraTrajectory`), the
world dataset's bit masks, the client tools, and the WebUI (through ``GET /v1/actions``, the JSON of
:meth:`ActionTable.describe`).

A motion is a step along or about one axis of the camera, in OpenCV camera axes (x right, y down,
z forward): ``translate`` moves along the axis (kept horizontal), ``rotate`` turns about it by the
right-hand rule (+x looks up, +y turns right). The camera integrates four motions: translate x (strafe),
translate z (walk), rotate x (pitch, about the camera's own x) and rotate y (yaw, about the world
vertical).

The table's order is the world dataset's bit order (token ``k`` is bit ``k`` of a held-key mask):
add a token at the end, never in between, or datasets on disk change meaning.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Literal

import msgspec

Kind = Literal["translate", "rotate"]
Axis = Literal["x", "y", "z"]
# (kind, axis) pairs the camera integrates
MOTION_AXES: frozenset[tuple[str, str]] = frozenset({("translate", "x"), ("translate", "z"), ("rotate", "x"), ("rotate", "y")})


class Motion(msgspec.Struct, frozen=True, kw_only=True):
    """What one token does: ``sign`` (+1 or -1) steps of ``kind`` along/about ``axis``.

    ``keys`` are further keyboard keys (``KeyboardEvent.key``, lower case) a UI binds to the token,
    besides the token's own letter.
    """

    token: str
    kind: Kind
    axis: Axis
    sign: int
    label: str
    keys: tuple[str, ...] = ()


class ActionTable:
    """An ordered, checked set of :class:`Motion` s, indexed by token."""

    def __init__(self, motions: Iterable[Motion]) -> None:
        self.motions: tuple[Motion, ...] = tuple(motions)
        bound: set[str] = set()
        for motion in self.motions:
            token = motion.token
            if len(token) != 1 or not ("a" <= token <= "z"):
                raise ValueError(f"token={token!r}: an action token is one lower-case letter a-z")
            if (motion.kind, motion.axis) not in MOTION_AXES:
                raise ValueError(f"token={token!r}: motion {motion.kind} {motion.axis} is not one the camera integrates")
            if motion.sign not in (1, -1):
                raise ValueError(f"token={token!r}: sign={motion.sign!r} must be 1 or -1")
            for key in (token, *motion.keys):
                if key in bound:
                    raise ValueError(f"token={token!r}: key {key!r} is bound twice")
                bound.add(key)
        self.tokens: tuple[str, ...] = tuple(motion.token for motion in self.motions)
        self._index = {token: i for i, token in enumerate(self.tokens)}

    def __iter__(self) -> Iterator[Motion]:
        return iter(self.motions)

    def __len__(self) -> int:
        return len(self.motions)

    def __contains__(self, token: object) -> bool:
        return token in self._index

    def motion(self, token: str) -> Motion:
        if token not in self._index:
            raise ValueError(f"action token {token!r} is unknown (known: {''.join(self.tokens)})")
        return self.motions[self._index[token]]

    def bit(self, token: str) -> int:
        """The token's bit in a held-key mask (its position in the table)."""
        self.motion(token)
        return self._index[token]

    def known(self, tokens: Iterable[str]) -> list[str]:
        """``tokens`` without the unknown ones (the protocol ignores those), order kept."""
        return [token for token in tokens if token in self._index]

    def select(self, kind: Kind, axis: Axis, sign: int | None = None) -> tuple[str, ...]:
        """The tokens of one motion axis (of one ``sign`` if given), in table order."""
        return tuple(
            m.token for m in self.motions if m.kind == kind and m.axis == axis and sign in (None, m.sign)
        )

    def step(self, held: Iterable[str], kind: Kind, axis: Axis) -> int:
        """Net steps along/about one axis for a set of held tokens: opposite tokens cancel."""
        keys = set(held)
        return sum(m.sign for m in self.motions if m.kind == kind and m.axis == axis and m.token in keys)

    def describe(self) -> dict[str, Any]:
        """The table as JSON data (``GET /v1/actions``): every motion with its bit, in table order."""
        return {"actions": [{**msgspec.to_builtins(m), "keys": list(m.keys), "bit": i} for i, m in enumerate(self.motions)]}


ACTIONS = ActionTable(
    [
        Motion(token="w", kind="translate", axis="z", sign=1, label="move forward"),
        Motion(token="s", kind="translate", axis="z", sign=-1, label="move back"),
        Motion(token="a", kind="translate", axis="x", sign=-1, label="move left"),
        Motion(token="d", kind="translate", axis="x", sign=1, label="move right"),
        Motion(token="i", kind="rotate", axis="x", sign=1, label="look up", keys=("arrowup",)),
        Motion(token="k", kind="rotate", axis="x", sign=-1, label="look down", keys=("arrowdown",)),
        Motion(token="j", kind="rotate", axis="y", sign=-1, label="look left", keys=("arrowleft",)),
        Motion(token="l", kind="rotate", axis="y", sign=1, label="look right", keys=("arrowright",)),
    ]
)
