"""The stage deployments, as plain classes (``app.build_app`` decorates and binds them).

Each wraps one engine host (:mod:`lingbot_ray.engine.hosts`) and adds only what serving needs: session
slots with a capacity, routing stats, health, and a single worker thread so model work never blocks the
replica's event loop (health checks and other sessions' small calls stay responsive). Their methods are
the chain's (:mod:`lingbot_ray.engine.chain`): the same names, the same typed messages.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import functools
import logging
import os
import time
from typing import Any

import torch

from lingbot_ray.checkpoint import ensure_checkpoint
from lingbot_ray.engine import SessionSpec, TextStage, VAEStage
from lingbot_ray.engine.hosts import SessionHost, VAEHost
from lingbot_ray.engine.memory import MemoryGuard, ModelMemory
from lingbot_ray.engine.messages import ChunkRequest, DiTChunk, FrameChunk, PostOptions, PromptEmbeds, SessionOpened
from lingbot_ray.engine.postprocess import PostHost, PostStage
from lingbot_ray.protocol import CapacityError, SessionLost

from .backend import replica_tag
from .autoscaling import Drain, DrainBoard
from .config import ModelConfig, ScalingConfig, ServeConfig
from .dit_group import DiTRank, RankGroup

logger = logging.getLogger("ray.serve")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def apply_threads(model: ModelConfig) -> None:
    if model.torch_threads is not None:
        torch.set_num_threads(model.torch_threads)


def load_folder(model: ModelConfig):
    """Apply the model section's thread count and return its checkpoint folder."""
    apply_threads(model)
    return ensure_checkpoint(model.path, build_tiny_if_missing=model.build_tiny_if_missing, revision=model.revision, settings=model.checkpoint_settings)


class _StageReplica:
    """Shared plumbing of the sticky stages: one model-work thread, and session slots.

    A session takes a slot in two calls: ``open_session`` reserves it (no model work, so a full
    replica refuses at once, before anyone encodes anything; the router sends it to the replica with
    the most free slots), then ``start_session`` does the model work and the host keeps the session's
    state. ``close_session`` frees both, at any point, and is remembered for a while so that a
    reservation or start that arrives after its close (calls are not ordered) is refused instead of
    holding a slot. Slots no call has touched for ``idle_timeout_s`` are released, so sessions of an
    ingress that died without closing them do not hold their slots forever.
    """

    STAGE = "stage"
    CLOSED_MEMORY = 4096  # closed session ids remembered (bounded: a replica lives for days)
    host: SessionHost

    def __init__(self, capacity: int, idle_timeout_s: float):
        self.capacity = capacity
        self.held: set[str] = set()  # sessions with a slot here: reserved or started
        self.replica_id = replica_tag()
        self.idle_timeout_s = idle_timeout_s
        self._closed: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._touched: dict[str, float] = {}
        self.starts = 0  # sessions whose model work began here (operators; tests of early refusal)
        self.drain: Drain | None = None  # set by a Serve replica whose stage autoscales
        self._reaper: asyncio.Task | None = None
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    def _touch(self, sid: str) -> None:
        self._touched[sid] = time.monotonic()
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap_idle())

    async def _reap_idle(self) -> None:
        while True:
            await asyncio.sleep(max(0.05, self.idle_timeout_s / 4))
            now = time.monotonic()
            for sid, touched in list(self._touched.items()):
                if now - touched > self.idle_timeout_s:
                    logger.warning(
                        "%s: session %s idle for %.0f s, released (its ingress is gone?)", self.replica_id, sid, now - touched
                    )
                    await self.close_session(sid)

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    def _session(self, sid: str) -> None:
        """Fail fast, before queueing behind other sessions' work, for a session not held here."""
        if sid not in self.host:
            raise SessionLost(f"session {sid} is not held by {self.replica_id} (its replica restarted?)")
        self._touch(sid)

    def _check_held(self, sid: str) -> None:
        """Before a session's model work: its slot must be reserved and not closed since."""
        if sid not in self.held:
            raise SessionLost(f"session {sid} has no slot on {self.replica_id} (closed, or never reserved)")
        self.starts += 1
        self._touch(sid)

    def _still_held(self, sid: str) -> None:
        """For model work that can stop halfway: raises once the session was closed here."""
        if sid not in self.held:
            raise SessionLost(f"session {sid} was closed on {self.replica_id} while it started")

    async def _started(self, sid: str) -> None:
        """After a session's model work: drop the state again if the session was closed meanwhile."""
        if sid not in self.held:
            await self._close_state(sid)
            raise SessionLost(f"session {sid} was closed on {self.replica_id} while it started")
        self._touch(sid)

    async def _close_state(self, sid: str) -> None:
        await self._run(self.host.close_session, sid)

    async def open_session(self, sid: str) -> str:
        """Reserve a slot for ``sid`` (no model work); returns this replica's id."""
        if sid in self._closed:
            raise SessionLost(f"session {sid} was already closed on {self.replica_id}")
        if sid in self.held:
            raise ValueError(f"session_id={sid!r}: already open on {self.replica_id}")
        if self.drain is not None and self.drain.retired:
            raise CapacityError(f"{self.STAGE} {self.replica_id} is retiring (scaled down)")
        if len(self.held) >= self.capacity:
            raise CapacityError(f"{self.STAGE} {self.replica_id} holds {len(self.held)}/{self.capacity} sessions")
        self.held.add(sid)
        self._touch(sid)
        return self.replica_id

    async def record_routing_stats(self) -> dict[str, Any]:
        """For the session routers (twice a second): a draining replica shows no free slot."""
        if self.drain is not None:
            await self.drain.poll(lambda: len(self.held))
            if self.drain.draining or self.drain.retired:
                return {"sessions": len(self.held), "capacity": len(self.held)}
        return {"sessions": len(self.held), "capacity": self.capacity}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """For the autoscaling policy (lingbot_ray/serve/autoscaling.py)."""
        return {"sessions": float(len(self.held)), "retired": float(self.drain is not None and self.drain.retired)}

    def check_health(self) -> None:
        if self.drain is not None and self.drain.retired:
            raise RuntimeError(f"{self.replica_id} retired: drained by autoscaling and empty; Serve stops it")

    def describe(self) -> dict[str, Any]:
        """Who this replica is and which sessions it holds (tests, operators)."""
        return {
            "replica_id": self.replica_id,
            "pid": os.getpid(),
            "sessions": sorted(self.held),
            "capacity": self.capacity,
            "starts": self.starts,
        }

    async def close_session(self, sid: str) -> bool:
        held = sid in self.held
        self.held.discard(sid)
        self._touched.pop(sid, None)
        self._closed[sid] = None
        while len(self._closed) > self.CLOSED_MEMORY:
            self._closed.popitem(last=False)
        if sid in self.host:
            await self._close_state(sid)
        return held


class TextEncoder:
    """Prompt → embeddings (stateless; the encoder caches recent prompts)."""

    def __init__(self, config: ServeConfig):
        folder = load_folder(config.model)
        device = "cpu" if config.text_encoder.cpu_offload else config.model.device
        self.stage = TextStage.from_pretrained(folder, device=device, dtype=torch_dtype(config.model.text_encoder_dtype))
        self.replica_id = replica_tag()
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="text")

    def describe(self) -> dict[str, Any]:
        entries, size = self.stage.prompt_encoder.cache_stats
        return {"replica_id": self.replica_id, "pid": os.getpid(), "cache_entries": entries, "cache_bytes": size}

    async def embed(self, prompt: str | None, negative: bool = False) -> PromptEmbeds:
        return await asyncio.get_running_loop().run_in_executor(self._worker, self.stage.embed, prompt, negative)

    async def prepare(self, request: ChunkRequest) -> ChunkRequest:
        return await asyncio.get_running_loop().run_in_executor(self._worker, self.stage.prepare, request)


class DiTGroup(_StageReplica):
    """The causal DiT and every live session's KV cache, camera and generator state (sticky).

    One replica is one group of ``dit.sequence_parallel_degree`` ranks (:mod:`.dit_group`); rank 0
    runs here and is this replica's host."""

    STAGE = "DiT group"

    def __init__(self, config: ServeConfig):
        super().__init__(config.dit.sessions_per_group, config.dit.session_idle_timeout_s)
        self.ranks = RankGroup(config, self._run)
        self.host = self.ranks.local
        # Admission by memory: rank 0 refuses a session whose DiT state would not fit in what its GPU
        # has free (an InsufficientMemory, i.e. a CapacityError: close 1013), in its start_session
        # right before allocating. Every rank holds the same share, and rank 0's GPU may carry the VAE.
        stage = self.host.stage
        model = ModelMemory.of_dit(stage)
        self.host.memory = MemoryGuard(model, stage.device, sequence_parallel=self.ranks.size, vae=False)
        logger.info("DiTGroup %s ready: %d rank(s), %d session slot(s)", self.replica_id, self.ranks.size, self.capacity)

    async def start_session(
        self, sid: str, spec: SessionSpec, condition: Any, prompt: PromptEmbeds, negative: PromptEmbeds | None
    ) -> SessionOpened:
        self._check_held(sid)
        opened = await self.ranks.call(DiTRank.start_session, sid, spec, condition, prompt, negative)
        await self._started(sid)
        return dataclasses.replace(opened, dit_replica=self.replica_id)

    async def step(self, sid: str, request: ChunkRequest) -> DiTChunk:
        self._session(sid)
        chunk = await self.ranks.call(DiTRank.step, sid, request)
        return dataclasses.replace(chunk, dit_replica=self.replica_id)

    async def _close_state(self, sid: str) -> None:
        await self.ranks.call(DiTRank.close_session, sid)

    def check_health(self) -> None:
        super().check_health()
        self.ranks.check_health()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "ranks": self.ranks.size, "rank_pids": self.ranks.pids()}


class VAEDecoder(_StageReplica):
    """First-frame encoding and every live session's streaming decode cache (sticky)."""

    STAGE = "VAE decoder"

    def __init__(self, config: ServeConfig):
        super().__init__(config.vae.sessions_per_replica, config.vae.session_idle_timeout_s)
        folder = load_folder(config.model)
        stage = VAEStage.from_pretrained(
            folder, device=config.model.device, decoder=config.vae.decoder, tiny_decoder_path=config.vae.tiny_decoder_path
        )
        self.host = VAEHost(stage)

    async def start_session(self, sid: str, spec: SessionSpec) -> Any:
        """Set up the session's decode cache and return its condition latents (for the DiT)."""
        self._check_held(sid)
        condition = await self._run(self.host.start_session, sid, spec, functools.partial(self._still_held, sid))
        await self._started(sid)
        return condition

    async def decode(self, sid: str, chunk: DiTChunk) -> FrameChunk:
        self._session(sid)
        return await self._run(self.host.decode, sid, chunk)


class PostProcess(_StageReplica):
    """RIFE interpolation, then Real-ESRGAN upscaling, per session (sticky: RIFE pairs a chunk's first
    frame with the previous chunk's last). Weights are loaded once per path and shared by sessions."""

    STAGE = "post-process"

    def __init__(self, config: ServeConfig):
        super().__init__(config.postprocess.sessions_per_replica, config.postprocess.session_idle_timeout_s)
        apply_threads(config.model)
        self.host = PostHost(PostStage(device=config.model.device, tile=config.postprocess.tile))

    async def start_session(self, sid: str, options: PostOptions) -> None:
        self._check_held(sid)
        await self._run(self.host.start_session, sid, options)
        await self._started(sid)

    async def process(self, sid: str, chunk: FrameChunk) -> FrameChunk:
        self._session(sid)
        return await self._run(self.host.process, sid, chunk)


class RayTextEncoder(TextEncoder):
    """The text encoder as a Serve replica: its prompt cache's size is exported."""

    def __init__(self, config: ServeConfig):
        from .metrics import TextCacheMetrics, served_model

        super().__init__(config)
        self.metrics = TextCacheMetrics(served_model(config), lambda: self.stage.prompt_encoder.cache_stats)


class _SlotGauges:
    """Mixed into a sticky stage as a Serve replica: its session slots (used, free) are exported,
    set on every reservation and close and refreshed on a timer (:class:`.metrics.ReplicaMetrics`)."""

    metrics: Any = None

    def _export_slots(self, model: str, kv_bytes=None, classes=None, scaling: ScalingConfig | None = None) -> None:
        """Export the slots; with ``scaling``, take part in session-aware autoscaling (:class:`Drain`)."""
        from .metrics import ReplicaMetrics

        self.metrics = ReplicaMetrics(model, lambda: (len(self.held), self.capacity), kv_bytes, classes=classes)
        if scaling is not None:
            from ray import serve

            context = serve.get_replica_context()
            self.drain = Drain(DrainBoard(context.app_name, context.deployment), context.replica_id.unique_id, scaling.drain_s)

    async def open_session(self, sid: str) -> str:
        try:
            return await super().open_session(sid)
        finally:
            if self.metrics is not None:
                self.metrics.update()

    async def close_session(self, sid: str) -> bool:
        try:
            return await super().close_session(sid)
        finally:
            if self.metrics is not None:
                self.metrics.update()


class RayDiTGroup(_SlotGauges, DiTGroup):
    """The DiT group as a Serve replica: slots and the bytes of its sessions' KV caches exported."""

    def __init__(self, config: ServeConfig):
        from .metrics import served_model

        super().__init__(config)
        self._export_slots(served_model(config), self.kv_cache_bytes, scaling=config.dit.autoscaling)

    def kv_cache_bytes(self) -> int:
        """Bytes of the KV caches of the sessions this group holds, over all its ranks (rank 0 holds
        heads/N of every cache, each rank the same share)."""
        states = list(self.host.sessions.values())  # the model thread adds and drops sessions
        caches = [getattr(state, "kv_cache", None) for state in states]
        return self.ranks.size * sum(cache.nbytes() for cache in caches if cache is not None)

    async def start_session(
        self, sid: str, spec: SessionSpec, condition: Any, prompt: PromptEmbeds, negative: PromptEmbeds | None
    ) -> SessionOpened:
        try:
            return await super().start_session(sid, spec, condition, prompt, negative)
        finally:
            self.metrics.update()  # its KV cache is allocated now


class RayVAEDecoder(_SlotGauges, VAEDecoder):
    def __init__(self, config: ServeConfig):
        from .metrics import served_model

        super().__init__(config)
        self._export_slots(served_model(config), scaling=config.vae.autoscaling)


class RayPostProcess(_SlotGauges, PostProcess):
    def __init__(self, config: ServeConfig):
        from .metrics import served_model

        super().__init__(config)
        self._export_slots(served_model(config), scaling=config.postprocess.autoscaling)
