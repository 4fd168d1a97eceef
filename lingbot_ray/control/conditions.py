"""The per-session condition queue: runtime events in, one :class:`ChunkConditions` per chunk out.

Semantics (docs/PROTOCOL.md, "Runtime events"), plus the decisions the protocol leaves open:

* **Prompt**: latest wins; applied at the next chunk boundary, never to chunk 0 (a prompt pushed
  before chunk 0 is sampled waits for chunk 1).
* **Camera script** (``list[list[str]]``, one entry per latent frame): replaces any pending script;
  each chunk consumes one entry per latent frame, ``()`` once it runs out. The init's
  ``condition_inputs.camera_actions`` is the initial script.
* **Camera state** (transitions): at each boundary all pending transitions are drained and the last
  becomes the held state. The *pulse candidate* is the latest drained transition that holds any key;
  if it differs from the final state, the chunk's first latent frame uses it and the rest use the
  final state. A non-empty final state is its own candidate, so a pulse happens only when every key
  was released by the boundary: ``[a]`` then ``[w]`` gives ``[w, w, w]``, ``[a]`` then ``[]`` gives
  ``[a, (), ()]``. This is the reference server's rule (docs/PROTOCOL.md, "Runtime events").
  With nothing pending the held state repeats.
* Script and state clear each other: a script event drops the held state and pending transitions,
  a state event drops the pending script.
* Action tokens are those of :data:`lingbot_ray.protocol.actions.ACTIONS`; unknown tokens are
  dropped, duplicates within one state transition are merged (states are compared as sets).
* State transitions are the protocol's :class:`~lingbot_ray.protocol.StateTransition` (the decoded
  event's, as they are); anything else is a ``ValueError``.
* **Caps** (``max_pending``, default 512): a script longer than that is rejected with
  ``ValueError`` (nothing is changed); pending transitions beyond it drop the *oldest*, which only
  loses possible pulses, never the newest (final) state.
* **event_id echo**: every chunk carries the id of the most recently *sampled* event and it
  persists until another is sampled. A prompt event is sampled when it is applied at a boundary; a
  script event when a chunk consumes its first entry (the next boundary; an empty script counts as
  consumed there too, so its id still shows); state transitions when drained. Camera sampling
  overrides prompt sampling within one chunk. An event without an id never changes the echo, and an
  event that is dropped before being sampled (a replaced prompt or script, transitions dropped by a
  script) is never echoed.
* ``composite_input`` pushes each listed part with the same id. Its camera part may show at
  chunk 0 while its prompt part waits for chunk 1; the echo is the same id either way.

This module imports neither torch nor numpy (only the protocol) so the ingress can use it cheaply.
It is thread-safe: the event reader and the generation loop may run on different threads.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..protocol.actions import ACTIONS
from ..protocol.client_messages import MAX_PENDING_ENTRIES, StateTransition

logger = logging.getLogger(__name__)

DEFAULT_MAX_PENDING = MAX_PENDING_ENTRIES  # the protocol's default limits.max_script_entries

Actions = tuple[str, ...]


def clean_actions(actions: Iterable[str]) -> Actions:
    """Known tokens only, first occurrence kept, in the given order."""
    if isinstance(actions, str):
        raise ValueError(f"actions must be a list of tokens, got the string {actions!r}")
    return tuple(dict.fromkeys(ACTIONS.known(actions)))


def _check_prompt(text: Any) -> None:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"prompt must be a non-empty string, got {text!r}")


def _cleaned(transitions: Iterable[StateTransition]) -> list[StateTransition]:
    """The transitions with their actions cleaned (see :func:`clean_actions`)."""
    out = []
    for item in transitions:
        if not isinstance(item, StateTransition):
            raise ValueError(f"state transition {item!r}: expected a StateTransition(actions, client_ts_ms)")
        out.append(StateTransition(clean_actions(item.actions), item.client_ts_ms))
    return out


@dataclass(frozen=True)
class ChunkConditions:
    """What one chunk is conditioned on.

    ``prompt`` is a *new* prompt to apply at this boundary (None = unchanged); ``camera_actions``
    has one entry per latent frame of the chunk; ``event_id`` is the echo for every message of it.
    """

    prompt: str | None
    camera_actions: tuple[Actions, ...]
    event_id: int | None


class ConditionQueue:
    """Pending prompt/camera events of one session, sampled once per chunk boundary."""

    def __init__(
        self, initial_script: Sequence[Iterable[str]] | None = None, *, max_pending: int = DEFAULT_MAX_PENDING
    ) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self._max_pending = max_pending
        self._lock = threading.Lock()
        self._prompt: str | None = None
        self._prompt_id: int | None = None
        self._script: deque[Actions] = deque()
        self._transitions: deque[StateTransition] = deque()
        self._held: Actions = ()
        # Kind of the camera event waiting to be sampled ("script"/"state"); an empty script
        # still counts, so its id shows at the next boundary.
        self._camera_due: str | None = None
        self._camera_id: int | None = None
        self._event_id: int | None = None
        if initial_script is not None:
            # The init carries no event id: consuming it must not touch the echo.
            self._script = deque(self._checked_script(initial_script))

    # -- events ---------------------------------------------------------------------------------

    def push_prompt(self, text: str, event_id: int | None = None) -> None:
        _check_prompt(text)
        with self._lock:
            self._prompt, self._prompt_id = text, event_id

    def push_camera_script(self, script: Sequence[Iterable[str]], event_id: int | None = None) -> None:
        entries = self._checked_script(script)
        with self._lock:
            self._script = deque(entries)
            self._transitions.clear()
            self._held = ()
            self._camera_due, self._camera_id = "script", event_id

    def push_camera_state(self, transitions: Iterable[StateTransition], event_id: int | None = None) -> None:
        new = _cleaned(transitions)
        with self._lock:
            if self._camera_due == "script":
                # The script was never sampled, so it is dropped and its id never shows.
                self._camera_id = None
            self._script.clear()
            self._transitions.extend(new)
            overflow = len(self._transitions) - self._max_pending
            if overflow > 0:
                logger.warning(
                    "dropping the %d oldest of %d pending state transitions", overflow, len(self._transitions)
                )
                for _ in range(overflow):
                    self._transitions.popleft()
            self._camera_due = "state"
            if event_id is not None:
                self._camera_id = event_id

    def push_composite(
        self,
        input_types: Iterable[str],
        prompt: str | None = None,
        camera_script: Sequence[Iterable[str]] | None = None,
        camera_state: Iterable[StateTransition] | None = None,
        event_id: int | None = None,
    ) -> None:
        """Apply each listed part of a ``composite_input`` as its own event with the same id."""
        types = set(input_types)
        if not types or types - {"prompt", "camera_actions"}:
            raise ValueError(f"input_types {sorted(types)} must name prompt and/or camera_actions only")
        if "prompt" in types and prompt is None:
            raise ValueError("input_types lists prompt but no prompt was given")
        camera = "camera_actions" in types
        if camera and (camera_script is None) == (camera_state is None):
            raise ValueError("input_types lists camera_actions: give one of camera_script, camera_state")
        # Validate every part before applying any, so a bad event changes nothing.
        if "prompt" in types:
            _check_prompt(prompt)
        if camera and camera_script is not None:
            self._checked_script(camera_script)
        elif camera:
            camera_state = _cleaned(camera_state)
        if "prompt" in types:
            self.push_prompt(prompt, event_id)
        if camera and camera_script is not None:
            self.push_camera_script(camera_script, event_id)
        elif camera:
            self.push_camera_state(camera_state, event_id)

    # -- sampling -------------------------------------------------------------------------------

    def sample(self, num_latent_frames: int, chunk_index: int) -> ChunkConditions:
        """Take the conditions for chunk ``chunk_index`` (called once per chunk boundary)."""
        if num_latent_frames < 1:
            raise ValueError(f"num_latent_frames must be >= 1, got {num_latent_frames}")
        if chunk_index < 0:
            raise ValueError(f"chunk_index must be >= 0, got {chunk_index}")
        with self._lock:
            prompt = None
            if self._prompt is not None and chunk_index > 0:
                prompt = self._prompt
                if self._prompt_id is not None:
                    self._event_id = self._prompt_id
                self._prompt, self._prompt_id = None, None

            if self._camera_due is not None and self._camera_id is not None:
                self._event_id = self._camera_id
            self._camera_due, self._camera_id = None, None

            if self._script:
                taken = [self._script.popleft() for _ in range(min(num_latent_frames, len(self._script)))]
                actions = taken + [()] * (num_latent_frames - len(taken))
            else:
                actions = self._drain_state(num_latent_frames)
            return ChunkConditions(prompt=prompt, camera_actions=tuple(actions), event_id=self._event_id)

    def _drain_state(self, num_latent_frames: int) -> list[Actions]:
        if not self._transitions:
            return [self._held] * num_latent_frames
        drained = list(self._transitions)
        self._transitions.clear()
        self._held = drained[-1].actions
        pulse = next((t.actions for t in reversed(drained) if t.actions), ())
        if set(pulse) == set(self._held):
            return [self._held] * num_latent_frames
        return [pulse] + [self._held] * (num_latent_frames - 1)

    def _checked_script(self, script: Sequence[Iterable[str]]) -> list[Actions]:
        if isinstance(script, (str, bytes)) or not isinstance(script, Sequence):
            raise ValueError(f"a camera script must be a list of action lists, got {type(script).__name__}")
        if len(script) > self._max_pending:
            raise ValueError(f"camera script has {len(script)} entries, at most {self._max_pending} accepted")
        return [clean_actions(entry) for entry in script]

    # -- introspection --------------------------------------------------------------------------

    @property
    def pending_prompt(self) -> str | None:
        return self._prompt

    @property
    def held_state(self) -> Actions:
        return self._held

    @property
    def pending_script(self) -> tuple[Actions, ...]:
        return tuple(self._script)

    @property
    def pending_transitions(self) -> tuple[StateTransition, ...]:
        return tuple(self._transitions)

    @property
    def event_id(self) -> int | None:
        """The current echo (the id of the most recently sampled event with an id)."""
        return self._event_id
