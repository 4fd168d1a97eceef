"""One realtime session per WebSocket: the protocol's lifecycle on top of a :class:`StageBackend`.

1. Read messages until one validates as ``init`` (each invalid one gets ``invalid generate
   request``; the socket stays open), for at most ``ingress.init_timeout_s``. A socket that has not
   sent a valid init holds no session slot: it counts only against ``ingress.max_pending_inits``.
2. Admission before any model work: a slot of this ingress, then a slot on every sticky stage
   (refused with 1013 when none has room).
3. From here the event reader runs, and it is also how a disconnect is noticed: while the stages
   open the session (prompt, first frame, DiT state) and while it streams. A client that leaves
   during the opening stops it.
4. The generation loop is pipelined: chunk N+1's conditions are sampled and its DiT work submitted
   as soon as chunk N's DiT work ends, while chunk N decodes and chunk N-1 is encoded and sent. At
   most ``max_chunks_in_flight`` chunks are between "submitted" and "sent", so a slow client pauses
   generation instead of growing queues; nothing the session keeps grows with its length.
5. Whatever ends the session (``max_chunks``, disconnect, error, shutdown), the slots are given back
   before anything else (synchronously, so a cancelled handler cannot skip it), every stage frees
   its state, and one log line records the session's figures.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from lingbot_ray.control.conditions import ConditionQueue
from lingbot_ray.checkpoint import ModelGeometry
from lingbot_ray.engine.messages import FrameChunk, PostOptions
from lingbot_ray.engine.session import SessionSpec
from lingbot_ray.protocol import (
    CapacityError,
    ChunkStats,
    ClientEvent,
    InitLimits,
    InitRequest,
    InitTimeout,
    InvalidEvent,
    InvalidInit,
    MessageTooBig,
    ProtocolError,
    ServerShutdown,
    SessionDefaults,
    decode_event,
    decode_init,
    encode_server_message,
    outcome_for,
)
from lingbot_ray.transport import make_encoder

from .backend import StageBackend
from .media import MediaPolicy, load_first_frame
from .stats import QuantileSketch

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class SessionSettings:
    """What the ingress knows about the served model and its own limits."""

    served_model: str
    geometry: ModelGeometry
    # what an init leaves out: the served checkpoint's defaults (CheckpointFacts.session_defaults)
    defaults: SessionDefaults
    limits: InitLimits = field(default_factory=InitLimits)
    media: MediaPolicy = field(default_factory=MediaPolicy)
    # the largest WebSocket message either way: outbound chunks are split below it, inbound
    # messages above it close the socket with 1009
    max_message_bytes: int = 8 * 2**20
    max_chunks_in_flight: int = 2
    stage_timeout_s: float = 120.0
    init_timeout_s: float = 30.0
    # post-processing: server-side weights, and where a client's own paths may point
    rife_model_path: str | None = None
    esrgan_model_path: str | None = None
    model_dirs: tuple[str, ...] = ()

    def _model_path(self, requested: str | None, configured: str | None, enabled_field: str, path_field: str, setting: str) -> str:
        """The weights for a post-processing stage a session asked for: its own path (only inside
        ``postprocess.model_dirs``) or the server's; never a silent fallback to no model."""
        if requested:
            real = os.path.realpath(requested)
            roots = [os.path.realpath(root) for root in self.model_dirs]
            if not any(os.path.commonpath([real, root]) == root for root in roots):
                raise InvalidInit(path_field, requested, "outside the allowed model directories (postprocess.model_dirs)")
            if not os.path.isfile(real):
                raise InvalidInit(path_field, requested, "no such file")
            return real
        if configured:
            return configured
        logger.warning("a session asks for %s but %s is not set on this server", enabled_field, setting)
        raise InvalidInit(enabled_field, True, f"no model configured on this server ({setting})")

    def post_options(self, init: InitRequest) -> PostOptions | None:
        """The post-processing an init asks for, with its weights' paths checked."""
        if not (init.enable_frame_interpolation or init.enable_upscaling):
            return None
        s = self
        options = PostOptions()
        if init.enable_frame_interpolation:
            rife = self._model_path(
                init.frame_interpolation_model_path, s.rife_model_path,
                "enable_frame_interpolation", "frame_interpolation_model_path", "postprocess.rife_model_path",
            )
            options = PostOptions(exp=init.frame_interpolation_exp, flow_scale=init.frame_interpolation_scale, rife_path=rife)
        if init.enable_upscaling:
            esrgan = self._model_path(
                init.upscaling_model_path, s.esrgan_model_path,
                "enable_upscaling", "upscaling_model_path", "postprocess.esrgan_model_path",
            )
            options = PostOptions(
                exp=options.exp, flow_scale=options.flow_scale, rife_path=options.rife_path,
                upscale=float(init.upscaling_scale), esrgan_path=esrgan,
            )
        return options

    def spec_for(self, init: InitRequest) -> SessionSpec:
        """The engine's session spec for a validated init (reads the first frame: blocking)."""
        image = load_first_frame(init.first_frame, init.width, init.height, self.media)
        try:
            spec = SessionSpec(
                prompt=init.prompt,
                image=image,
                width=init.width,
                height=init.height,
                num_frames=init.num_frames,
                seed=init.seed,
                num_inference_steps=init.num_inference_steps,
                guidance_scale=init.guidance_scale,
                negative_prompt=init.negative_prompt,
                sink_size=init.realtime_causal_sink_size,
                window_frames=init.realtime_causal_kv_cache_num_frames,
                quality=init.quality,
            )
            spec.resolve(self.geometry)
        except ValueError as exc:
            # the engine names its own fields: tell the client the init field it sent
            name = str(exc).split("=", 1)[0] if "=" in str(exc) else ""
            wire = _WIRE_FIELDS.get(name, name if name in InitRequest.__struct_fields__ else "init")
            raise InvalidInit(wire, getattr(init, wire, None), str(exc).split(": ", 1)[-1]) from None
        return spec


class Slots:
    """A counted resource with a cap (sessions, sockets waiting for init). Taking and giving back
    are synchronous, so no cancellation can land between a session's end and its release."""

    def __init__(self, limit: int, what: str):
        self.limit, self.what, self.used = limit, what, 0

    def take(self) -> None:
        if self.used >= self.limit:
            raise CapacityError(f"{self.what} {self.used}/{self.limit}")
        self.used += 1

    def give(self) -> None:
        self.used -= 1
        assert self.used >= 0, "slot given back twice"


# SessionSpec fields whose init field has another name
_WIRE_FIELDS = {
    "window_frames": "realtime_causal_kv_cache_num_frames",
    "sink_size": "realtime_causal_sink_size",
    "width": "size",
    "height": "size",
    "image": "first_frame",
}


def apply_event(queue: ConditionQueue, event: ClientEvent) -> None:
    """Queue a validated runtime event: every kind is a composite of at most one prompt and one
    camera part (docs/PROTOCOL.md, "Runtime events"). Raises ValueError for a payload the queue
    cannot take."""
    camera = event.camera_script if event.camera_script is not None else event.camera_state
    input_types = [name for name, part in (("prompt", event.prompt), ("camera_actions", camera)) if part is not None]
    queue.push_composite(
        input_types,
        prompt=event.prompt,
        camera_script=event.camera_script,
        camera_state=event.camera_state,
        event_id=event.event_id,
    )


class _Closed(Exception):
    """The client went away."""


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1e3))


class SessionDriver:
    def __init__(
        self,
        websocket: WebSocket,
        backend: StageBackend,
        settings: SessionSettings,
        metrics=None,
        *,
        sessions: Slots,
        waiting: Slots,
    ):
        """``sessions``/``waiting``: the ingress replica's slots, shared by all its sockets."""
        self.ws = websocket
        self.backend = backend
        self.settings = settings
        # this session's view of the ingress's metrics: it keeps the session's init and event times
        self.metrics = metrics.for_session() if metrics is not None else None
        self.sessions = sessions
        self.waiting = waiting
        self.session_id = uuid.uuid4().hex
        self._send_lock = asyncio.Lock()
        self._chunk_ms = QuantileSketch()
        self._frames_sent = 0
        self._bytes_sent = 0
        self._dit_replica = ""
        self._task: asyncio.Task | None = None
        self._going_away: str | None = None

    def go_away(self, reason: str) -> None:
        """End this socket now with close 1001 and ``reason`` (the server is stopping), whatever
        phase it is in: chunks not yet sent are dropped, and a chunk whose frames were partly sent
        ends without its ``chunk_stats``."""
        if self._task is not None and self._going_away is None:
            self._going_away = reason
            self._task.cancel()

    # -- wire ------------------------------------------------------------------------------------

    async def _send(self, message) -> int:
        data = encode_server_message(message)
        async with self._send_lock:
            if self.ws.application_state != WebSocketState.CONNECTED:
                raise _Closed()
            await self.ws.send_bytes(data)
        return len(data)

    async def _receive(self) -> bytes:
        message = await self.ws.receive()
        if message["type"] == "websocket.disconnect":
            raise _Closed()
        data = message.get("bytes")
        if data is None:  # a text frame: the protocol is binary MessagePack only
            data = (message.get("text") or "").encode()
        limit = self.settings.max_message_bytes
        if len(data) > limit:
            raise MessageTooBig(f"{len(data)} bytes > {limit} (ingress.max_message_bytes)")
        return data

    async def _close(self, code: int, reason: str) -> None:
        if self.ws.application_state == WebSocketState.CONNECTED:
            try:
                await self.ws.close(code=code, reason=reason)
            except Exception:  # already gone
                pass

    # -- lifecycle -------------------------------------------------------------------------------

    async def run(self) -> None:
        self._task = asyncio.current_task()
        started = time.perf_counter()
        end_reason, admitted, opened = "client left before init", False, False
        tasks: list[asyncio.Task] = []  # cancelled at the end
        opening: asyncio.Task | None = None
        try:
            # Step 1: a valid init, in time; the socket holds no session slot yet
            self.waiting.take()
            try:
                init, spec, post = await asyncio.wait_for(self._read_init(), self.settings.init_timeout_s)
            except asyncio.TimeoutError:
                raise InitTimeout(f"no valid init within {self.settings.init_timeout_s:g} s (ingress.init_timeout_s)") from None
            finally:
                self.waiting.give()
            # Step 2: this ingress's slot; the stages' slots are reserved first thing in open
            self.sessions.take()
            admitted = True
            # Step 3: the reader watches the socket while the stages open the session
            queue = ConditionQueue(init.camera_script, max_pending=self.settings.limits.max_script_entries)
            reader = asyncio.create_task(self._read_events(queue))
            tasks.append(reader)
            opening = asyncio.create_task(self.backend.open(self.session_id, spec, post))
            info = await self._unless_gone(opening, reader, "opening the session")
            opened = True
            self._dit_replica = info.dit_replica
            self._log_start(init, spec)
            if self.metrics:
                self.metrics.session_started()
            # Step 4: stream until max_chunks, a disconnect or a failure
            generator = asyncio.create_task(self._generate(init, queue, info.latent_frames_per_chunk))
            tasks.append(generator)
            done, _ = await asyncio.wait({reader, generator}, return_when=asyncio.FIRST_COMPLETED)
            if generator in done:
                generator.result()  # raises the generation failure, if any
                end_reason = "generation complete"
                await self._end(None)
            else:
                reader.result()  # raises why the reader stopped: the client left, or broke a limit
        except (_Closed, WebSocketDisconnect):
            end_reason = "client disconnected"
        except asyncio.CancelledError:
            if self._going_away is None:
                end_reason = "cancelled"
                raise
            end_reason = f"server shutting down: {self._going_away}"
            task = asyncio.current_task()
            if hasattr(task, "uncancel"):  # Python >= 3.11: this cancellation is handled
                task.uncancel()
            await self._end(ServerShutdown(self._going_away))
        except Exception as exc:
            end_reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if self.metrics and not opened:
                self.metrics.session_rejected(type(exc).__name__)
            await self._end(exc)
        finally:
            # Step 5: the bookkeeping first, with no await before it; then the stages' cleanup,
            # shielded, so that a cancelled handler still frees every stage's state
            if admitted:
                self.sessions.give()
            if opened:
                if self.metrics:
                    self.metrics.session_ended()
                self._log_end(started, end_reason)
            # an unfinished opening is given up too: its stage calls are cancelled where they wait
            tasks += [opening] if opening else []
            for task in tasks:
                task.cancel()
            if admitted:
                await asyncio.shield(self._release(tasks))

    async def _release(self, tasks: list[asyncio.Task]) -> None:
        """Close the session on every stage, then collect what is still running for it.

        The closing is how work already running stops: a stage refuses a start or a chunk of a
        session it has closed, the VAE stops a first-frame encoding at its next step, and a chunk
        stops at the next chunk boundary (a model call cannot be interrupted in the middle).
        """
        await self.backend.close(self.session_id)
        if tasks:
            await asyncio.wait(tasks, timeout=self.settings.stage_timeout_s)
        for task in tasks:
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: an abandoned call's failure is expected, not news

    async def _unless_gone(self, task: asyncio.Task, reader: asyncio.Task, what: str):
        """``task``'s result, unless the client leaves (the reader ends) or the stages take longer
        than ``ingress.stage_timeout_s`` first; the task is then given up in :meth:`run`."""
        done, _ = await asyncio.wait({task, reader}, timeout=self.settings.stage_timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        if reader in done:
            reader.result()  # raises why the reader stopped
        raise TimeoutError(f"{what} took longer than ingress.stage_timeout_s={self.settings.stage_timeout_s:g} s")

    async def _end(self, exc: BaseException | None) -> None:
        outcome = outcome_for(exc)
        if exc is not None and not isinstance(exc, ProtocolError):
            logger.warning("session %s failed: %r", self.session_id, exc)
        try:
            if outcome.error is not None:
                await self._send(outcome.error)
        except Exception:  # the client is already gone: nothing more to tell it
            return
        if outcome.close_code is not None:
            await self._close(int(outcome.close_code), outcome.close_reason)

    async def _read_init(self) -> tuple[InitRequest, SessionSpec, PostOptions | None]:
        s = self.settings
        while True:
            data = await self._receive()
            received = time.perf_counter()
            try:
                init = decode_init(data, served_model=s.served_model, defaults=s.defaults, limits=s.limits)
                post = s.post_options(init)
                spec = await asyncio.to_thread(s.spec_for, init)
                if self.metrics:
                    self.metrics.init_received(received)
                return init, spec, post
            except ProtocolError as exc:
                logger.info("session %s: invalid init: %s", self.session_id, exc)
                await self._send(outcome_for(exc).error)

    async def _read_events(self, queue: ConditionQueue) -> None:
        while True:
            data = await self._receive()
            received = time.perf_counter()
            try:
                event = decode_event(data, limits=self.settings.limits)
                apply_event(queue, event)
                if self.metrics:
                    self.metrics.event_received(event.event_id, received)
            except ProtocolError as exc:
                logger.info("session %s: invalid event: %s", self.session_id, exc)
                await self._send(outcome_for(exc).error)
            except ValueError as exc:
                logger.info("session %s: invalid event: %s", self.session_id, exc)
                await self._send(outcome_for(InvalidEvent("payload", None, str(exc))).error)

    # -- generation ------------------------------------------------------------------------------

    async def _generate(self, init: InitRequest, queue: ConditionQueue, latent_frames: int) -> None:
        slots = asyncio.Semaphore(self.settings.max_chunks_in_flight)
        ready: asyncio.Queue = asyncio.Queue()
        in_flight: set = set()  # submitted and not yet sent: at most max_chunks_in_flight
        producer = asyncio.create_task(self._produce(init, queue, latent_frames, slots, ready, in_flight))
        sender = asyncio.create_task(self._send_chunks(init, ready, slots, in_flight))
        try:
            done, _ = await asyncio.wait({producer, sender}, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # a failure of either ends the session
            await sender
        finally:
            for task in (producer, sender):
                task.cancel()
            for future in in_flight:
                future.cancel()

    async def _produce(self, init, queue, latent_frames, slots, ready, in_flight) -> None:
        chunk_index = 0
        while init.max_chunks is None or chunk_index < init.max_chunks:
            await slots.acquire()
            prepare_start = time.perf_counter()
            conditions = queue.sample(latent_frames, chunk_index)
            future = self.backend.submit(self.session_id, conditions)
            in_flight.add(future)
            await ready.put((chunk_index, conditions.event_id, future, prepare_start, time.perf_counter()))
            # Conditions for the next chunk are sampled once this chunk's DiT work ends.
            await asyncio.wait_for(future.dit_done, self.settings.stage_timeout_s)
            chunk_index += 1
        await ready.put(None)

    async def _send_chunks(self, init: InitRequest, ready: asyncio.Queue, slots: asyncio.Semaphore, in_flight: set) -> None:
        encoder = make_encoder(
            init.realtime_output_format,
            quality=init.preview_quality,
            preview_max_width=init.realtime_preview_max_width,
            max_message_bytes=self.settings.max_message_bytes,
        )
        # interpolation multiplies the frames: they play at fps · 2^exp
        fps = float(init.fps) * (2**init.frame_interpolation_exp if init.enable_frame_interpolation else 1)
        playback_start: float | None = None
        while True:
            item = await ready.get()
            if item is None:
                return
            chunk_index, event_id, future, prepare_start, submit_time = item
            result: FrameChunk = await asyncio.wait_for(future.result, self.settings.stage_timeout_s)
            forward_end = time.perf_counter()
            frames: np.ndarray = result.frames

            encode_start = time.perf_counter()
            batches = await asyncio.to_thread(
                encoder.encode_chunk, frames, request_id=self.session_id, chunk_index=chunk_index, event_id=event_id, fps=fps
            )
            encode_end = time.perf_counter()

            pace_wait = 0.0
            if init.realtime_output_pacing:
                if playback_start is None:
                    playback_start = encode_end
                due = playback_start + self._frames_sent / fps
                pace_wait = max(0.0, due - time.perf_counter())
                if pace_wait:
                    await asyncio.sleep(pace_wait)

            write_start = time.perf_counter()
            payload_bytes = 0
            for batch in batches:
                payload_bytes += await self._send(batch)
            write_end = time.perf_counter()
            in_flight.discard(future)
            slots.release()

            timings = result.timings
            forward_s = forward_end - submit_time
            stats = ChunkStats(
                session_id=self.session_id,
                request_id=self.session_id,
                chunk_index=chunk_index,
                event_id=event_id,
                num_frames=int(frames.shape[0]),
                num_batches=len(batches),
                content_type=encoder.content_type,
                raw_bytes=int(frames.nbytes),
                ws_payload_bytes=payload_bytes,
                request_prepare_ms=_ms(submit_time - prepare_start),
                scheduler_forward_ms=_ms(forward_s),
                pace_wait_ms=_ms(pace_wait),
                # Frame headers travel inside each frame_batch message: there is no separate write.
                header_write_ms=0,
                raw_payload_build_ms=_ms(encode_end - encode_start),
                raw_write_ms=_ms(write_end - write_start),
                ws_write_ms=_ms(write_end - write_start),
                chunk_total_ms=_ms(time.perf_counter() - prepare_start),
                text_encoder_ms=round(timings.text_encoder_ms),
                dit_ms=round(timings.dit_ms),
                vae_ms=round(timings.vae_ms),
                postprocess_ms=round(timings.postprocess_ms),
                queue_wait_ms=_ms(max(0.0, forward_s - timings.total_ms / 1e3)),
                width=int(frames.shape[2]),
                height=int(frames.shape[1]),
                fps=fps,
                replica_id=result.dit_replica,
                num_inference_steps=init.num_inference_steps,
            )
            await self._send(stats)
            self._chunk_ms.add(stats.chunk_total_ms)
            self._frames_sent += int(frames.shape[0])
            self._bytes_sent += payload_bytes
            if self.metrics:
                self.metrics.chunk_sent(stats, timings, sampled_at=prepare_start, sent_at=write_end)

    # -- logging ---------------------------------------------------------------------------------

    def _log_start(self, init: InitRequest, spec: SessionSpec) -> None:
        logger.info(
            "session start id=%s model=%s size=%s num_frames=%d steps=%d seed=%d format=%s max_chunks=%s dit=%s",
            self.session_id,
            init.model,
            init.size,
            spec.num_frames,
            spec.num_inference_steps,
            spec.seed,
            init.realtime_output_format or "delta-gzip",
            init.max_chunks,
            self._dit_replica,
        )

    def _log_end(self, started: float, reason: str) -> None:
        duration = time.perf_counter() - started
        logger.info(
            "session end id=%s reason=%r chunks=%d frames=%d duration_s=%.1f generated_fps=%.2f "
            "chunk_ms_p50=%.0f chunk_ms_p95=%.0f bytes=%d dit=%s",
            self.session_id,
            reason,
            self._chunk_ms.count,
            self._frames_sent,
            duration,
            self._frames_sent / duration if duration > 0 else 0.0,
            self._chunk_ms.quantile(0.5),
            self._chunk_ms.quantile(0.95),
            self._bytes_sent,
            self._dit_replica,
        )
