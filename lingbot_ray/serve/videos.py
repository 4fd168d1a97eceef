"""``POST /v1/videos``: a whole clip from a prompt, a first frame and a script, as one MP4
(docs/PROTOCOL.md, "Offline clips").

A clip is a session that no one watches live: it takes the same ingress and stage slots as a
realtime session, is validated by the same ``init`` rules (its errors name the same fields), and
runs the same chain, so a clip and a WebSocket session with the same seed and script have the same
frames. Events carry the chunk they apply to (``at_chunk``): they are queued just before that
chunk's conditions are sampled, so a clip is deterministic where a live session depends on when its
events arrive. A client that goes away frees the stages at the next chunk.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import time
import uuid
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from lingbot_ray.control.conditions import ConditionQueue
from lingbot_ray.protocol import CapacityError, InvalidInit, ProtocolError, decode_event, decode_init
from lingbot_ray.transport.mp4 import Mp4Writer

from .backend import StageBackend
from .session import SessionSettings, Slots, apply_event, playback_fps

logger = logging.getLogger("ray.serve")

MEDIA_TYPES = {"application/json": msgspec.json.decode, "application/msgpack": msgspec.msgpack.decode, "application/x-msgpack": msgspec.msgpack.decode}
SPOOL_BYTES = 16 * 2**20  # an MP4 larger than this is spooled to a temporary file
_BOUNDARY = "lingbot-clip"


def http_error(status: int, message: str, *, field: str | None = None, detail: str | None = None, headers=None) -> Response:
    error = {"message": message, "type": "invalid_request_error" if status < 500 else "server_error"}
    if field is not None:
        error["param"] = field
    if detail is not None:
        error["detail"] = detail
    return Response(msgspec.json.encode({"error": error}), status_code=status, media_type="application/json", headers=headers)


class ClipRequest(msgspec.Struct, forbid_unknown_fields=True):
    """What ``/v1/videos`` takes beside the ``init`` fields."""

    events: list[dict[str, Any]] = msgspec.field(default_factory=list)
    # libx264rgb at crf 0: the frames decode bit for bit (large files); else H.264 yuv420p at crf 18
    lossless: bool = False


async def read_request_map(request: Request, limit: int, shape: str) -> dict[str, Any]:
    """An HTTP request's body, at most ``limit`` bytes, decoded by its content type (JSON or
    MessagePack) into a map; raises InvalidInit naming ``body`` or ``content-type``. ``shape`` says
    what the map should be, for the error."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise InvalidInit("body", f"<{declared} bytes>", f"larger than {limit} bytes (ingress.max_message_bytes)")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise InvalidInit("body", f"<over {limit} bytes>", f"larger than {limit} bytes (ingress.max_message_bytes)")
    media_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if media_type not in MEDIA_TYPES:
        raise InvalidInit("content-type", media_type, f"must be one of {sorted(MEDIA_TYPES)}")
    try:
        message = MEDIA_TYPES[media_type](bytes(body))
    except (msgspec.DecodeError, RecursionError) as exc:
        raise InvalidInit("body", f"<{len(body)} bytes>", f"not {media_type}: {exc}") from None
    if not isinstance(message, dict):
        raise InvalidInit("body", type(message).__name__, f"must be {shape}")
    return message


def _parse(message: dict[str, Any], settings: SessionSettings, max_chunks: int):
    """The clip's init, its events by chunk and its options; raises InvalidInit naming the field."""
    extra = {key: message.pop(key) for key in ClipRequest.__struct_fields__ if key in message}
    try:
        options = msgspec.convert(extra, ClipRequest)
    except msgspec.ValidationError as exc:
        raise InvalidInit(str(exc).rsplit("at `$.", 1)[-1].rstrip("`") if "$." in str(exc) else "events", None, str(exc)) from None
    init = decode_init({**message, "type": "init"}, served_model=settings.served_model, defaults=settings.defaults, limits=settings.limits)
    if init.max_chunks is None or init.max_chunks > max_chunks:
        raise InvalidInit("max_chunks", init.max_chunks, f"a clip needs max_chunks, at most {max_chunks} (ingress.max_clip_chunks)")
    if len(options.events) > settings.limits.max_script_entries:
        raise InvalidInit("events", f"<{len(options.events)} events>", f"more than {settings.limits.max_script_entries}")
    events: dict[int, list] = {}
    for index, raw in enumerate(options.events):
        at = raw.get("at_chunk")
        if isinstance(at, bool) or not isinstance(at, int) or not 0 <= at < init.max_chunks:
            raise InvalidInit(f"events[{index}].at_chunk", at, f"must be a chunk index in [0, {init.max_chunks})")
        fields = {key: value for key, value in raw.items() if key != "at_chunk"}
        try:
            event = decode_event({**fields, "type": "event"}, limits=settings.limits)
        except ProtocolError as exc:
            raise InvalidInit(f"events[{index}].{exc.field}", exc.value, exc.reason) from None
        events.setdefault(at, []).append(event)
    return init, events, options


class ClipRunner:
    """Runs one ``/v1/videos`` request against the ingress's backend and slots."""

    def __init__(self, backend: StageBackend, settings: SessionSettings, sessions: Slots, max_clip_chunks: int):
        self.backend, self.settings, self.sessions, self.max_clip_chunks = backend, settings, sessions, max_clip_chunks

    async def __call__(self, request: Request) -> Response:
        s = self.settings
        try:
            message = await read_request_map(request, s.max_message_bytes, "a map of init fields")
            init, events, options = _parse(message, s, self.max_clip_chunks)
            post = s.post_options(init)
            spec = await asyncio.to_thread(s.spec_for, init)
        except ProtocolError as exc:
            return http_error(400, "invalid generate request", field=exc.field, detail=str(exc))
        try:
            self.sessions.take()
        except CapacityError as exc:
            return http_error(503, f"no capacity: {exc}", headers={"Retry-After": "5"})
        sid = uuid.uuid4().hex
        started = time.perf_counter()
        spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
        writer = Mp4Writer(spool, lossless=options.lossless)
        stats: list[dict[str, Any]] = []
        end = "complete"
        try:
            opened = await asyncio.wait_for(self.backend.open(sid, spec, post), s.stage_timeout_s)
            queue = ConditionQueue(init.camera_script, max_pending=s.limits.max_script_entries)
            fps = playback_fps(init)
            for index in range(init.max_chunks):
                if await request.is_disconnected():
                    end = "client went away"
                    return Response(status_code=499)
                for event in events.get(index, ()):
                    apply_event(queue, event)
                conditions = queue.sample(opened.latent_frames_per_chunk, index)
                chunk_start = time.perf_counter()
                future = self.backend.submit(sid, conditions)
                result = await asyncio.wait_for(future.result, s.stage_timeout_s)
                encode_start = time.perf_counter()
                await asyncio.to_thread(writer.write, result.frames, fps)
                done = time.perf_counter()
                t = result.timings
                stats.append({
                    "chunk_index": index,
                    "event_id": conditions.event_id,
                    "frames": int(result.frames.shape[0]),
                    "text_encoder_ms": round(t.text_encoder_ms), "dit_ms": round(t.dit_ms),
                    "vae_ms": round(t.vae_ms), "postprocess_ms": round(t.postprocess_ms),
                    "chunk_total_ms": round((encode_start - chunk_start) * 1e3),
                    "mp4_encode_ms": round((done - encode_start) * 1e3),
                    "replica_id": result.dit_replica,
                })
            await asyncio.to_thread(writer.close)
        except CapacityError as exc:
            end = f"refused: {exc}"
            return http_error(503, f"no capacity: {exc}", headers={"Retry-After": "5"})
        except ProtocolError as exc:
            end = f"invalid: {exc}"
            return http_error(400, "invalid generate request", field=exc.field, detail=str(exc))
        except Exception as exc:
            end = f"{type(exc).__name__}: {exc}"
            logger.warning("clip %s failed: %r", sid, exc)
            return http_error(500, f"error during generate loop: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        finally:
            self.sessions.give()
            await asyncio.shield(self.backend.close(sid))
            if end != "complete":
                spool.close()
            logger.info(
                "clip %s ended (%s): %d chunk(s), %d frame(s) in %.1f s",
                sid, end, len(stats), writer.frames, time.perf_counter() - started,
            )
        summary = {
            "id": sid,
            "model": s.served_model,
            "chunks": len(stats),
            "frames": writer.frames,
            "fps": fps,
            "width": int(spec.width),
            "height": int(spec.height),
            "seed": init.seed,
            "lossless": options.lossless,
            "total_ms": round((time.perf_counter() - started) * 1e3),
        }
        return self._respond(request, spool, summary, stats)

    @staticmethod
    def _respond(request: Request, spool, summary: dict[str, Any], stats: list[dict[str, Any]]) -> Response:
        """The MP4, with the summary in a header; with ``Accept: multipart/mixed``, the per-chunk
        stats as a JSON part first, then the MP4 part (docs/PROTOCOL.md, "Offline clips")."""
        size = spool.seek(0, 2)
        spool.seek(0)
        multipart = "multipart/mixed" in request.headers.get("accept", "")

        def parts():
            try:
                if multipart:
                    document = json.dumps({**summary, "chunk_stats": stats}).encode()
                    yield (f"--{_BOUNDARY}\r\nContent-Type: application/json\r\n"
                           f"Content-Length: {len(document)}\r\n\r\n").encode() + document + b"\r\n"
                    yield f"--{_BOUNDARY}\r\nContent-Type: video/mp4\r\nContent-Length: {size}\r\n\r\n".encode()
                while block := spool.read(2**20):
                    yield block
                if multipart:
                    yield f"\r\n--{_BOUNDARY}--\r\n".encode()
            finally:
                spool.close()

        headers = {"X-Lingbot-Clip": json.dumps(summary, separators=(",", ":"))}
        if multipart:
            return StreamingResponse(parts(), media_type=f"multipart/mixed; boundary={_BOUNDARY}", headers=headers)
        headers["Content-Length"] = str(size)
        return StreamingResponse(parts(), media_type="video/mp4", headers=headers)
