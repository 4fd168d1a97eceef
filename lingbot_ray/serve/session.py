"""One realtime session: the protocol's lifecycle on top of a :class:`StageBackend`, whatever carries
it. :class:`StreamingSession` is the lifecycle; :class:`SessionDriver` carries it over a WebSocket,
and :mod:`.webrtc` over a WebRTC peer connection (frames as a video track, messages on a data
channel). Both run the same steps, producer and event reader:

1. A valid ``init``. On a WebSocket: messages are read until one validates (each invalid one gets
   ``invalid generate request``; the socket stays open), for at most ``ingress.init_timeout_s``; a
   socket that has not sent a valid init holds no session slot, it counts only against
   ``ingress.max_pending_inits``. Over WebRTC the init came with the offer and was validated there.
2. Admission before any model work: a slot of this ingress, then a slot on every sticky stage
   (refused with 1013 when none has room).
3. From here the event reader runs, and it is also how a disconnect is noticed: while the stages
   open the session (prompt, first frame, DiT state) and while it streams. A client that leaves
   during the opening stops it.
4. The generation loop is pipelined: chunk N+1's conditions are sampled and its DiT work submitted
   as soon as chunk N's DiT work ends, while chunk N decodes and chunk N-1 is encoded and sent. At
   most ``max_chunks_in_flight`` chunks are between "submitted" and "sent", so a slow client pauses
   generation instead of growing queues; nothing the session keeps grows with its length. Where the
   frames go is the transport's :class:`FrameOutput`; the rest of the loop is shared.
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
from typing import Protocol

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


class Closed(Exception):
    """The client went away (its socket, peer connection or data channel closed)."""


def playback_fps(init: InitRequest) -> float:
    """The rate a session's frames play at: its ``fps``, times 2^exp with interpolation."""
    return float(init.fps) * (2**init.frame_interpolation_exp if init.enable_frame_interpolation else 1)


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1e3))


@dataclass(frozen=True)
class Delivery:
    """How one chunk's frames went out: the transport's share of the chunk's ``chunk_stats``."""

    num_batches: int  # frame_batch messages (0 when frames travel as video)
    payload_bytes: int
    encode_s: float
    pace_wait_s: float  # held back so that frames leave at the session's fps
    write_s: float
    sent_at: float  # time.perf_counter() when the chunk's last frame left


class FrameOutput(Protocol):
    """Where a session's frames go: frame batches on a WebSocket, or a WebRTC video track.
    ``deliver`` returns once the chunk's frames have left (paced, if the output paces)."""

    content_type: str

    async def deliver(self, frames: np.ndarray, *, chunk_index: int, event_id: int | None, fps: float) -> Delivery: ...


class StreamingSession:
    """One session's lifecycle (the module docstring's steps), shared by the transports.

    A transport says how a message goes out (:meth:`_send`), comes in (:meth:`_receive`) and how
    the client is let go (:meth:`_close`); how the init arrives (:meth:`_admit`); what happens once
    the stages hold the session (:meth:`_opened`); and where frames go (:meth:`_frame_output`).
    """

    # end reason of a session that never got past step 1
    unstarted_reason = "client left before init"

    def __init__(self, backend: StageBackend, settings: SessionSettings, metrics=None, *, sessions: Slots):
        """``sessions``: the ingress replica's session slots, shared by all its sessions."""
        self.backend = backend
        self.settings = settings
        # this session's view of the ingress's metrics: it keeps the session's init and event times
        self.metrics = metrics.for_session() if metrics is not None else None
        self.sessions = sessions
        self.session_id = uuid.uuid4().hex
        self._chunk_ms = QuantileSketch()
        self._frames_sent = 0
        self._bytes_sent = 0
        self._dit_replica = ""
        self._task: asyncio.Task | None = None
        self._going_away: str | None = None

    def go_away(self, reason: str) -> None:
        """End this session now with close 1001 and ``reason`` (the server is stopping), whatever
        phase it is in: chunks not yet sent are dropped, and a chunk whose frames were partly sent
        ends without its ``chunk_stats``."""
        if self._task is not None and self._going_away is None:
            self._going_away = reason
            self._task.cancel()

    # -- transport -------------------------------------------------------------------------------

    async def _send(self, message) -> int:
        """Send one server message; raises :class:`Closed` once the client is gone."""
        raise NotImplementedError

    async def _receive(self) -> bytes:
        """The next client message; raises :class:`Closed` once the client is gone."""
        raise NotImplementedError

    async def _close(self, code: int, reason: str) -> None:
        raise NotImplementedError

    async def _admit(self) -> tuple[InitRequest, SessionSpec, PostOptions | None]:
        """Step 1: a valid init, its engine spec and post-processing."""
        raise NotImplementedError

    async def _opened(self) -> None:
        """The stages hold the session (step 3 done); the transport may now tell the client."""

    def _frame_output(self, init: InitRequest) -> FrameOutput:
        raise NotImplementedError

    # -- lifecycle -------------------------------------------------------------------------------

    async def run(self) -> None:
        self._task = asyncio.current_task()
        started = time.perf_counter()
        end_reason, admitted, opened = self.unstarted_reason, False, False
        tasks: list[asyncio.Task] = []  # cancelled at the end
        opening: asyncio.Task | None = None
        try:
            # Step 1: a valid init; the session holds no session slot yet
            init, spec, post = await self._admit()
            # Step 2: this ingress's slot; the stages' slots are reserved first thing in open
            self.sessions.take()
            admitted = True
            # Step 3: the reader watches the client while the stages open the session
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
            await self._opened()
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
        except (Closed, WebSocketDisconnect):
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
        output = self._frame_output(init)
        # interpolation multiplies the frames: they play at fps · 2^exp
        fps = playback_fps(init)
        while True:
            item = await ready.get()
            if item is None:
                return
            chunk_index, event_id, future, prepare_start, submit_time = item
            result: FrameChunk = await asyncio.wait_for(future.result, self.settings.stage_timeout_s)
            forward_end = time.perf_counter()
            frames: np.ndarray = result.frames

            delivery = await output.deliver(frames, chunk_index=chunk_index, event_id=event_id, fps=fps)
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
                num_batches=delivery.num_batches,
                content_type=output.content_type,
                raw_bytes=int(frames.nbytes),
                ws_payload_bytes=delivery.payload_bytes,
                request_prepare_ms=_ms(submit_time - prepare_start),
                scheduler_forward_ms=_ms(forward_s),
                pace_wait_ms=_ms(delivery.pace_wait_s),
                # Frame headers travel inside each frame_batch message: there is no separate write.
                header_write_ms=0,
                raw_payload_build_ms=_ms(delivery.encode_s),
                raw_write_ms=_ms(delivery.write_s),
                ws_write_ms=_ms(delivery.write_s),
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
            self._bytes_sent += delivery.payload_bytes
            if self.metrics:
                self.metrics.chunk_sent(stats, timings, sampled_at=prepare_start, sent_at=delivery.sent_at)

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
            self._format_name(init),
            init.max_chunks,
            self._dit_replica,
        )

    def _format_name(self, init: InitRequest) -> str:
        return init.realtime_output_format or "delta-gzip"

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


class WebSocketFrames:
    """Frames as ``frame_batch`` messages in the init's output format, paced at fps when the init
    asks for ``realtime_output_pacing`` (counted from the first chunk, so a late chunk catches up)."""

    def __init__(self, send, init: InitRequest, *, request_id: str, max_message_bytes: int):
        self._send = send
        self._request_id = request_id
        self._pacing = init.realtime_output_pacing
        self._encoder = make_encoder(
            init.realtime_output_format,
            quality=init.preview_quality,
            preview_max_width=init.realtime_preview_max_width,
            max_message_bytes=max_message_bytes,
        )
        self.content_type = self._encoder.content_type
        self._playback_start: float | None = None
        self._frames_sent = 0

    async def deliver(self, frames: np.ndarray, *, chunk_index: int, event_id: int | None, fps: float) -> Delivery:
        encode_start = time.perf_counter()
        batches = await asyncio.to_thread(
            self._encoder.encode_chunk, frames, request_id=self._request_id, chunk_index=chunk_index, event_id=event_id, fps=fps
        )
        encode_end = time.perf_counter()

        pace_wait = 0.0
        if self._pacing:
            if self._playback_start is None:
                self._playback_start = encode_end
            due = self._playback_start + self._frames_sent / fps
            pace_wait = max(0.0, due - time.perf_counter())
            if pace_wait:
                await asyncio.sleep(pace_wait)

        write_start = time.perf_counter()
        payload_bytes = 0
        for batch in batches:
            payload_bytes += await self._send(batch)
        write_end = time.perf_counter()
        self._frames_sent += int(frames.shape[0])
        return Delivery(len(batches), payload_bytes, encode_end - encode_start, pace_wait, write_end - write_start, write_end)


class SessionDriver(StreamingSession):
    """One realtime session per WebSocket (``WS /v1/realtime_video/generate``)."""

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
        super().__init__(backend, settings, metrics, sessions=sessions)
        self.ws = websocket
        self.waiting = waiting
        self._send_lock = asyncio.Lock()

    async def _send(self, message) -> int:
        data = encode_server_message(message)
        async with self._send_lock:
            if self.ws.application_state != WebSocketState.CONNECTED:
                raise Closed()
            await self.ws.send_bytes(data)
        return len(data)

    async def _receive(self) -> bytes:
        message = await self.ws.receive()
        if message["type"] == "websocket.disconnect":
            raise Closed()
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

    def _frame_output(self, init: InitRequest) -> FrameOutput:
        return WebSocketFrames(self._send, init, request_id=self.session_id, max_message_bytes=self.settings.max_message_bytes)

    async def _admit(self) -> tuple[InitRequest, SessionSpec, PostOptions | None]:
        # the socket counts against max_pending_inits until it has sent a valid init, in time
        self.waiting.take()
        try:
            return await asyncio.wait_for(self._read_init(), self.settings.init_timeout_s)
        except asyncio.TimeoutError:
            raise InitTimeout(f"no valid init within {self.settings.init_timeout_s:g} s (ingress.init_timeout_s)") from None
        finally:
            self.waiting.give()

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
