"""The stage deployments, as plain classes (``app.build_app`` decorates and binds them).

Each wraps one engine stage and adds only what serving needs: a session table for the sticky
stages, capacity, routing stats, health, and a single worker thread so model work never blocks the
replica's event loop (health checks and other sessions' small calls stay responsive).

Tensors cross replica boundaries as numpy arrays (zero-copy between replicas on one node).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lingbot_ray.control.conditions import ChunkConditions
from lingbot_ray.engine import SessionSpec, TextStage, VAEStage
from lingbot_ray.protocol import CapacityError, SessionLost

from .checkpoint import apply_threads, ensure_checkpoint, torch_dtype
from .config import ServeConfig
from .dit_group import RankGroup

logger = logging.getLogger("ray.serve")


def replica_tag() -> str:
    """This replica's id (``DiTGroup#abc123``), or a process tag outside Serve."""
    try:
        from ray import serve

        context = serve.get_replica_context()
        return f"{context.deployment}#{context.replica_id.unique_id}"
    except Exception:  # not inside a Serve replica: in-process backends and tests
        return f"local-{os.getpid()}"


class _StageReplica:
    """Shared plumbing of the sticky stages: one model-work thread, and session slots.

    A session takes a slot in two calls: ``open_session`` reserves it (no model work, so a full
    replica refuses at once, before anyone encodes anything; the router sends it to the replica with
    the most free slots), then ``start_session`` does the model work and installs the session's
    state. ``close_session`` frees both, at any point, and is remembered for a while so that a
    reservation or start that arrives after its close (calls are not ordered) is refused instead of
    holding a slot. Slots no call has touched for ``idle_timeout_s`` are released, so sessions of an
    ingress that died without closing them do not hold their slots forever.
    """

    STAGE = "stage"
    CLOSED_MEMORY = 4096  # closed session ids remembered (bounded: a replica lives for days)

    def __init__(self, capacity: int, idle_timeout_s: float):
        self.capacity = capacity
        self.sessions: dict[str, Any] = {}  # started sessions' state
        self.held: set[str] = set()  # sessions with a slot here: reserved or started
        self.replica_id = replica_tag()
        self.idle_timeout_s = idle_timeout_s
        self._closed: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._touched: dict[str, float] = {}
        self.starts = 0  # sessions whose model work began here (operators; tests of early refusal)
        self._reaper: asyncio.Task | None = None
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    def _touch(self, sid: str) -> None:
        self._touched[sid] = time.monotonic()
        if self._reaper is None:
            try:  # also called from the model thread, which has no event loop
                self._reaper = asyncio.get_running_loop().create_task(self._reap_idle())
            except RuntimeError:
                pass

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

    async def _timed(self, fn, *args) -> tuple[Any, float]:
        """Run on the model thread; the time is the work alone, not the wait for the thread."""

        def call():
            start = time.perf_counter()
            return fn(*args), (time.perf_counter() - start) * 1e3

        return await self._run(call)

    def _session(self, sid: str):
        state = self.sessions.get(sid)
        if state is None:
            raise SessionLost(f"session {sid} is not held by {self.replica_id} (its replica restarted?)")
        self._touch(sid)
        return state

    def _check_held(self, sid: str) -> None:
        """Before a session's model work: its slot must be reserved and not closed since."""
        if sid not in self.held:
            raise SessionLost(f"session {sid} has no slot on {self.replica_id} (closed, or never reserved)")
        self.starts += 1
        self._touch(sid)

    async def _install(self, sid: str, state: Any) -> None:
        """Keep a started session's state, unless it was closed while it started."""
        if sid not in self.held:
            await self._run(state.release)
            raise SessionLost(f"session {sid} was closed on {self.replica_id} while it started")
        self.sessions[sid] = state

    async def open_session(self, sid: str) -> str:
        """Reserve a slot for ``sid`` (no model work); returns this replica's id."""
        if sid in self._closed:
            raise SessionLost(f"session {sid} was already closed on {self.replica_id}")
        if sid in self.held:
            raise ValueError(f"session_id={sid!r}: already open on {self.replica_id}")
        if len(self.held) >= self.capacity:
            raise CapacityError(f"{self.STAGE} {self.replica_id} holds {len(self.held)}/{self.capacity} sessions")
        self.held.add(sid)
        self._touch(sid)
        return self.replica_id

    def record_routing_stats(self) -> dict[str, Any]:
        return {"sessions": len(self.held), "capacity": self.capacity}

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
        state = self.sessions.pop(sid, None)
        if state is not None:
            await self._release(sid, state)
        return held

    async def _release(self, sid: str, state: Any) -> None:
        await self._run(state.release)


class TextEncoder:
    """Prompt → embeddings (stateless; the encoder caches recent prompts)."""

    def __init__(self, config: ServeConfig):
        apply_threads(config.model)
        folder = ensure_checkpoint(config.model)
        device = "cpu" if config.text_encoder.cpu_offload else config.model.device
        self.stage = TextStage.from_pretrained(folder, device=device, dtype=torch_dtype(config.model.text_encoder_dtype))
        self.replica_id = replica_tag()
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="text")

    def describe(self) -> dict[str, Any]:
        entries, size = self.stage.prompt_encoder.cache_stats
        return {"replica_id": self.replica_id, "pid": os.getpid(), "cache_entries": entries, "cache_bytes": size}

    def _encode(self, prompt: str | None, negative: bool) -> np.ndarray:
        embeds = self.stage.encode_negative(prompt) if negative else self.stage.encode(prompt)
        return embeds.float().cpu().numpy()

    async def encode(self, prompt: str | None, negative: bool = False) -> dict[str, Any]:
        def call():
            start = time.perf_counter()
            return self._encode(prompt, negative), (time.perf_counter() - start) * 1e3

        embeds, ms = await asyncio.get_running_loop().run_in_executor(self._worker, call)
        return {"embeds": embeds, "text_encoder_ms": ms}


class DiTGroup(_StageReplica):
    """The causal DiT and every live session's KV cache, camera and generator state (sticky).

    One replica is one group of ``dit.sequence_parallel_degree`` ranks (:mod:`.dit_group`)."""

    STAGE = "DiT group"

    def __init__(self, config: ServeConfig):
        super().__init__(config.dit.sessions_per_group, config.dit.session_idle_timeout_s)
        self.ranks = RankGroup(config, self._timed)
        self.sessions = self.ranks.local.sessions
        logger.info("DiTGroup %s ready: %d rank(s), %d session slot(s)", self.replica_id, self.ranks.size, self.capacity)

    async def start_session(
        self, sid: str, spec: SessionSpec, condition: Any, text: dict[str, Any], negative: dict[str, Any] | None
    ) -> dict[str, Any]:
        self._check_held(sid)
        negative_embeds = None if negative is None else negative["embeds"]
        latent_frames, _ = await self.ranks.call("open", sid, spec, condition, text["embeds"], negative_embeds)
        if sid not in self.held:  # closed while it started: the ranks hold the state, not self.sessions
            await self.ranks.call("close", sid)
            raise SessionLost(f"session {sid} was closed on {self.replica_id} while it started")
        self._touch(sid)
        return {"replica_id": self.replica_id, "latent_frames_per_chunk": latent_frames}

    async def step(self, sid: str, conditions: ChunkConditions, text: dict[str, Any] | None = None) -> dict[str, Any]:
        self._session(sid)  # fail fast, before queueing behind other sessions' work
        latents, dit_ms = await self.ranks.call("step", sid, conditions, None if text is None else text["embeds"])
        out = {"latents": latents, "dit_ms": dit_ms, "dit_replica": self.replica_id}
        if text is not None:
            out["text_encoder_ms"] = text["text_encoder_ms"]
        return out

    async def _release(self, sid: str, state: Any) -> None:
        await self.ranks.call("close", sid)

    def check_health(self) -> None:
        self.ranks.check_health()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "ranks": self.ranks.size, "rank_pids": self.ranks.pids()}


class VAEDecoder(_StageReplica):
    """First-frame encoding and every live session's streaming decode cache (sticky)."""

    STAGE = "VAE decoder"

    def __init__(self, config: ServeConfig):
        super().__init__(config.vae.sessions_per_replica, config.vae.session_idle_timeout_s)
        apply_threads(config.model)
        folder = ensure_checkpoint(config.model)
        self.stage = VAEStage.from_pretrained(folder, device=config.model.device)

    async def start_session(self, sid: str, spec: SessionSpec) -> Any:
        """Set up the session's decode cache and return its condition latents (for the DiT)."""
        self._check_held(sid)
        resolved = spec.resolve(self.stage.geometry)
        condition = await self._run(self.stage.encode_condition, spec.image)
        await self._install(sid, self.stage.new_session(resolved))
        return condition

    def _decode(self, sid: str, latents: np.ndarray) -> np.ndarray:
        return self.stage.decode(self._session(sid), torch.from_numpy(latents))

    async def decode(self, sid: str, dit_out: dict[str, Any]) -> dict[str, Any]:
        self._session(sid)
        frames, vae_ms = await self._timed(self._decode, sid, dit_out["latents"])
        out = {key: value for key, value in dit_out.items() if key != "latents"}
        out.update(frames=frames, vae_ms=vae_ms, vae_replica=self.replica_id)
        return out


@dataclass(frozen=True)
class PostOptions:
    """One session's post-processing: RIFE with 2^exp frames per interval (exp 0 = off), then
    upscaling by ``upscale`` (1 = off). Paths are already checked by the ingress."""

    exp: int = 0
    flow_scale: float = 1.0
    upscale: float = 1.0
    rife_path: str | None = None
    esrgan_path: str | None = None


class _PostState:
    def __init__(self, processor, options: PostOptions):
        from lingbot_ray.models.postprocess import PostProcessSession

        self.processor, self.options, self.session = processor, options, PostProcessSession()

    def release(self) -> None:
        self.session.release()


class PostProcess(_StageReplica):
    """RIFE interpolation, then Real-ESRGAN upscaling, per session (sticky: RIFE pairs a chunk's first
    frame with the previous chunk's last). Weights are loaded once per path and shared by sessions."""

    STAGE = "post-process"

    def __init__(self, config: ServeConfig):
        super().__init__(config.postprocess.sessions_per_replica, config.postprocess.session_idle_timeout_s)
        apply_threads(config.model)
        self.device = config.model.device
        self.tile = config.postprocess.tile
        self._models: dict[tuple[str, str], Any] = {}

    def _model(self, kind: str, path: str):
        from lingbot_ray.models.realesrgan import load_realesrgan
        from lingbot_ray.models.rife import load_rife

        key = (kind, os.path.realpath(path))
        if key not in self._models:
            loader = load_rife if kind == "rife" else load_realesrgan
            self._models[key] = loader(path, device=self.device)
            logger.info("%s: loaded %s weights from %s", self.replica_id, kind, path)
        return self._models[key]

    def _processor(self, options: PostOptions):
        from lingbot_ray.models.postprocess import PostProcessor

        rife = self._model("rife", options.rife_path) if options.exp else None
        esrgan = self._model("esrgan", options.esrgan_path) if options.upscale != 1 else None
        return PostProcessor(rife, esrgan, tile=self.tile)

    async def start_session(self, sid: str, options: PostOptions) -> None:
        self._check_held(sid)
        processor = await self._run(self._processor, options)
        await self._install(sid, _PostState(processor, options))

    async def process(self, sid: str, vae_out: dict[str, Any]) -> dict[str, Any]:
        state = self._session(sid)
        options = state.options
        frames, ms = await self._timed(
            lambda: state.processor.process(
                state.session, vae_out["frames"], exp=options.exp, scale=options.flow_scale, upscale=options.upscale
            )
        )
        return {**vae_out, "frames": frames, "postprocess_ms": ms, "post_replica": self.replica_id}
