"""The chunk-encoder interface shared by every wire format, input checks and the encode thread pool."""

from __future__ import annotations

import abc
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import ClassVar, TypeVar

import numpy as np

from lingbot_ray.protocol.server_messages import FrameBatch

from .batching import DEFAULT_MAX_MESSAGE_BYTES, HEADER_ROOM_BYTES, BatchPart, assemble, payload_budget

T = TypeVar("T")
R = TypeVar("R")

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def shared_executor() -> Executor:
    """The process-wide pool that encoders use unless given their own.

    Pillow, isal and numpy release the GIL while they work, so plain threads use every core; one
    pool for all sessions keeps the thread count bounded however many sessions are open.
    """
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 2), thread_name_prefix="lingbot-transport")
        return _pool


def check_frames(frames: object) -> np.ndarray:
    """Validate a chunk as ``uint8 [N, H, W, 3]`` and return it C-contiguous."""
    if not isinstance(frames, np.ndarray):
        raise ValueError(f"frames must be a numpy array, got {type(frames).__name__}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must have dtype uint8, got {frames.dtype}")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must have shape [N, H, W, 3], got {frames.shape}")
    if 0 in frames.shape:
        raise ValueError(f"frames must not be empty, got shape {frames.shape}")
    return np.ascontiguousarray(frames)


class ChunkEncoder(abc.ABC):
    """Turns one chunk of RGB frames into the ``frame_batch`` messages of one session.

    Use one instance per session: the delta-gzip encoder keeps the previous chunk's last frame as
    its reference, and :meth:`reset` forgets it. ``executor`` must not be the executor that calls
    :meth:`encode_chunk`, since the call waits on work it submits there.
    """

    content_type: ClassVar[str]
    encoding: ClassVar[str]

    def __init__(self, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, executor: Executor | None = None):
        if max_message_bytes <= HEADER_ROOM_BYTES:
            raise ValueError(
                f"max_message_bytes={max_message_bytes} must exceed the header room of {HEADER_ROOM_BYTES} bytes"
            )
        self.max_message_bytes = max_message_bytes
        self._executor = executor

    def encode_chunk(
        self,
        frames: np.ndarray,
        *,
        request_id: str,
        chunk_index: int,
        event_id: int | None = None,
        fps: float | None = None,
    ) -> list[FrameBatch]:
        """Encode ``frames`` (uint8 [N, H, W, 3]) as the chunk's frame batches, in send order.

        Raises ValueError for malformed frames, or for a frame that cannot fit one message alone.
        """
        frames = check_frames(frames)
        budget = payload_budget(self.max_message_bytes, request_id)
        parts = self._encode(frames, budget, chunk_index=chunk_index, event_id=event_id)
        return assemble(
            parts,
            content_type=self.content_type,
            encoding=self.encoding,
            request_id=request_id,
            chunk_index=chunk_index,
            event_id=event_id,
            width=frames.shape[2],
            height=frames.shape[1],
            fps=fps,
        )

    def reset(self) -> None:
        """Forget per-session state; the next chunk starts a fresh stream."""

    @abc.abstractmethod
    def _encode(self, frames: np.ndarray, budget: int, *, chunk_index: int, event_id: int | None) -> list[BatchPart]:
        """Encode validated frames into batches of at most ``budget`` payload bytes."""

    def _map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        items = list(items)
        if len(items) <= 1:
            # A pool round trip buys nothing for a single task.
            return [fn(item) for item in items]
        return list((self._executor or shared_executor()).map(fn, items))
