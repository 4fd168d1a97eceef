"""``POST /v1/realtime_video/webrtc``: a realtime session whose frames reach the client as a WebRTC
video track (docs/PROTOCOL.md, "WebRTC").

Signalling is one HTTP exchange: the client posts its SDP offer together with the session's
``init`` and gets the answer once the stages hold the session, so a bad init is a 400 naming the
field and a full server a 503, before any media flows. The session then runs the same lifecycle,
producer and event reader as a WebSocket session (:class:`~.session.StreamingSession`); only the
carriers differ:

- frames are encoded here (VP8 with libvpx or H.264 with libx264, at the bitrate and keyframe
  interval the offer asks for) and handed to aiortc as encoded packets, which a video track lets
  out at the session's fps;
- the client's data channel carries the runtime events in, and ``chunk_stats`` and ``error`` out,
  as the same MessagePack messages as on the WebSocket.

Closing the peer connection or the data channel ends the session: every slot is given back.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import av
import msgspec
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from starlette.requests import Request
from starlette.responses import Response

from lingbot_ray.engine.messages import PostOptions
from lingbot_ray.engine.session import SessionSpec
from lingbot_ray.protocol import (
    CapacityError,
    CloseCode,
    InitRequest,
    InitTimeout,
    InvalidInit,
    MessageTooBig,
    ProtocolError,
    ServerShutdown,
    decode_init,
    encode_server_message,
    outcome_for,
)

from .backend import StageBackend
from .config import IngressConfig
from .session import Closed, Delivery, FrameOutput, SessionSettings, Slots, StreamingSession, playback_fps
from .videos import http_error, read_request_map

logger = logging.getLogger("ray.serve")

CODECS = {"VP8": "libvpx", "H264": "libx264"}
MIN_BITRATE = 50_000
RTP_CLOCK = 90_000  # every video codec's RTP clock rate
_RTP_TIME = fractions.Fraction(1, RTP_CLOCK)
# how long the last messages of a session may take to leave before its channel is closed
_FLUSH_S = 2.0


# -- signalling ------------------------------------------------------------------------------------


class VideoOptions(msgspec.Struct, forbid_unknown_fields=True):
    """The offer's ``video`` field: what the session's track carries (absent: the server's defaults)."""

    codec: str | None = None
    bitrate: int | None = None  # bits per second
    keyframe_interval_s: float | None = None


@dataclass(frozen=True)
class Video:
    codec: str  # "VP8" or "H264"
    bitrate: int
    keyframe_interval_s: float

    def describe(self) -> dict[str, Any]:
        return {"codec": self.codec, "bitrate": self.bitrate, "keyframe_interval_s": self.keyframe_interval_s}


def resolve_video(options: VideoOptions | None, config: IngressConfig) -> Video:
    """The session's video settings: the offer's, within the server's bounds, else the defaults."""
    options = options or VideoOptions()
    codec = (options.codec or config.webrtc_codec).upper().replace(".", "").replace("-", "")
    if codec not in CODECS:
        raise InvalidInit("video.codec", options.codec, f"must be one of {sorted(CODECS)}")
    bitrate = config.webrtc_bitrate if options.bitrate is None else options.bitrate
    if isinstance(bitrate, bool) or not MIN_BITRATE <= bitrate <= config.webrtc_max_bitrate:
        raise InvalidInit("video.bitrate", bitrate, f"must be in [{MIN_BITRATE}, {config.webrtc_max_bitrate}] bits/s (ingress.webrtc_max_bitrate)")
    interval = config.webrtc_keyframe_interval_s if options.keyframe_interval_s is None else options.keyframe_interval_s
    if not 0.1 <= interval <= 60:
        raise InvalidInit("video.keyframe_interval_s", interval, "must be in [0.1, 60] seconds")
    return Video(codec, int(bitrate), float(interval))


@dataclass
class Offer:
    sdp: str
    init: InitRequest
    spec: SessionSpec
    post: PostOptions | None
    video: Video
    received: float  # time.perf_counter() when the request was read


async def read_offer(request: Request, settings: SessionSettings, config: IngressConfig) -> Offer:
    """The request's offer, init and video settings, validated like a WebSocket init; raises
    :class:`InvalidInit` naming the field."""
    message = await read_request_map(request, settings.max_message_bytes, '{"type": "offer", "sdp": ..., "init": {...}}')
    received = time.perf_counter()
    if message.get("type") != "offer":
        raise InvalidInit("type", message.get("type"), 'must be "offer"')
    sdp = message.get("sdp")
    if not isinstance(sdp, str) or not sdp.strip():
        raise InvalidInit("sdp", sdp, "must be the offer's SDP text")
    init_fields = message.get("init")
    if not isinstance(init_fields, dict):
        raise InvalidInit("init", init_fields, "must be a map of init fields (docs/PROTOCOL.md, init)")
    try:
        options = msgspec.convert(message.get("video") or {}, VideoOptions)
    except msgspec.ValidationError as exc:
        where = str(exc).rsplit("at `$.", 1)[-1].rstrip("`") if "$." in str(exc) else ""
        raise InvalidInit(f"video.{where}" if where else "video", message.get("video"), str(exc)) from None
    video = resolve_video(options, config)
    init = decode_init({**init_fields, "type": "init"}, served_model=settings.served_model, defaults=settings.defaults, limits=settings.limits)
    post = settings.post_options(init)
    spec = await asyncio.to_thread(settings.spec_for, init)
    return Offer(sdp, init, spec, post, video, received)


def _status(exc: BaseException) -> Response:
    """An error before the answer, as an HTTP answer: the same texts as the WebSocket's errors."""
    if isinstance(exc, ProtocolError):
        return http_error(400, exc.content, field=exc.field, detail=str(exc))
    message = outcome_for(exc).error.content
    if isinstance(exc, (CapacityError, ServerShutdown)):
        return http_error(503, message, headers={"Retry-After": "5"})
    return http_error(500, message)


# -- video -----------------------------------------------------------------------------------------


class VideoEncoder:
    """A session's frames → one encoded access unit per frame, with real-time settings: VP8 as
    libvpx's realtime CBR (aiortc's own settings), or constrained-baseline H.264 (libx264,
    zerolatency); a keyframe every ``keyframe_interval_s`` and when the receiver asks (a PLI)."""

    def __init__(self, video: Video, fps: float):
        self.video = video
        self.fps = fractions.Fraction(fps).limit_denominator(1001)
        self.codec: av.CodecContext | None = None
        self._pts = 0

    def _open(self, width: int, height: int) -> av.CodecContext:
        video = self.video
        codec = av.CodecContext.create(CODECS[video.codec], "w")
        codec.width, codec.height = width, height
        codec.pix_fmt = "yuv420p"
        codec.bit_rate = video.bitrate
        codec.time_base = 1 / self.fps
        codec.framerate = self.fps
        codec.gop_size = max(1, round(video.keyframe_interval_s * self.fps))
        codec.thread_count = 2 if width * height > 640 * 480 else 1
        if video.codec == "VP8":
            codec.qmin, codec.qmax = 2, 56
            codec.options = {
                "bufsize": str(video.bitrate),  # rc_buf_sz = 1000 ms
                "cpu-used": "-6",
                "deadline": "realtime",
                "lag-in-frames": "0",
                "minrate": str(video.bitrate),  # minrate = maxrate = bit_rate: CBR
                "maxrate": str(video.bitrate),
                "noise-sensitivity": "4",
                "overshoot-pct": "15",
                "partitions": "0",
                "static-thresh": "1",
                "undershoot-pct": "100",
            }
        else:
            codec.profile = "Baseline"  # what browsers offer: profile-level-id 42e01f / 42001f
            codec.options = {
                "preset": "veryfast",
                "tune": "zerolatency",
                "maxrate": str(video.bitrate),
                "bufsize": str(video.bitrate),
                # no keyframe on a scene cut: a session's keyframes come at the interval or on request
                "sc_threshold": "0",
            }
        return codec

    def encode_chunk(self, frames: np.ndarray, *, keyframe: bool = False) -> list[bytes]:
        """``frames`` [N, H, W, 3] uint8 RGB → N encoded frames (blocking: run it in a thread)."""
        height, width = frames.shape[1:3]
        if self.codec is None or (self.codec.width, self.codec.height) != (width, height):
            self.codec, keyframe = self._open(width, height), True
        out = []
        for index, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(format="yuv420p")
            frame.pts, frame.time_base = self._pts, self.codec.time_base
            frame.pict_type = av.video.frame.PictureType.I if keyframe and index == 0 else av.video.frame.PictureType.NONE
            self._pts += 1
            out.append(b"".join(bytes(packet) for packet in self.codec.encode(frame)))
        return out


@dataclass(eq=False)
class _ChunkPackets:
    payloads: list[bytes]
    queued_at: float
    first_left: float | None = None
    last_left: float | None = None
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class PacedTrack(MediaStreamTrack):
    """The session's video track: encoded frames out at ``fps``, as aiortc's sender asks for them.

    Frame *i* leaves 1/fps after frame *i−1*, or as soon as it exists if it comes later: a stall
    is never made up by a burst. Its RTP timestamp is the time it leaves, so the receiver's jitter
    buffer sees the stream as it is. A chunk counts as sent once the sender comes back for the
    frame after its last one, which is when the last one's packets are on the wire.
    """

    kind = "video"

    def __init__(self, fps: float):
        super().__init__()
        self.interval = 1.0 / fps
        self.keyframe_requested = False
        self._queue: asyncio.Queue[_ChunkPackets] = asyncio.Queue()
        self._current: _ChunkPackets | None = None
        self._index = 0
        self._start: float | None = None
        self._next_due = 0.0
        self._handed: _ChunkPackets | None = None  # whose last frame the sender is sending

    def put(self, payloads: list[bytes]) -> _ChunkPackets:
        chunk = _ChunkPackets([p for p in payloads if p], time.perf_counter())
        if not chunk.payloads:  # nothing to show (an encoder that swallowed every frame)
            chunk.first_left = chunk.last_left = chunk.queued_at
            chunk.done.set_result(None)
        else:
            self._queue.put_nowait(chunk)
        return chunk

    async def recv(self) -> av.Packet:
        if self._handed is not None:  # the sender is back: the previous chunk's last frame is out
            self._handed.done.set_result(None)
            self._handed = None
        if self.readyState != "live":
            raise MediaStreamError
        if self._current is None:
            self._current, self._index = await self._queue.get(), 0
        chunk = self._current
        now = time.perf_counter()
        if self._start is None:
            self._start = self._next_due = now
        due = max(self._next_due, now)
        if due > now:
            await asyncio.sleep(due - now)
        self._next_due = due + self.interval
        left = time.perf_counter()
        packet = av.Packet(chunk.payloads[self._index])
        packet.pts, packet.time_base = round((due - self._start) * RTP_CLOCK), _RTP_TIME
        if self._index == 0:
            chunk.first_left = left
        self._index += 1
        if self._index == len(chunk.payloads):
            chunk.last_left = left
            self._handed, self._current = chunk, None
        return packet

    def stop(self) -> None:
        super().stop()
        for chunk in [self._current, self._handed, *self._drain()]:
            if chunk is not None and not chunk.done.done():
                chunk.done.set_exception(Closed())
                chunk.done.exception()  # retrieved here: a delivery that waits re-raises it

    def _drain(self) -> list[_ChunkPackets]:
        chunks = []
        while not self._queue.empty():
            chunks.append(self._queue.get_nowait())
        return chunks


class WebRTCFrames:
    """Frames onto the session's :class:`PacedTrack`, encoded in a thread chunk by chunk; a chunk is
    delivered once its last frame has left, so at most ``max_chunks_in_flight`` chunks wait."""

    def __init__(self, track: PacedTrack, video: Video, fps: float):
        self.track = track
        self.encoder = VideoEncoder(video, fps)
        self.content_type = f"video/{video.codec}"

    async def deliver(self, frames: np.ndarray, *, chunk_index: int, event_id: int | None, fps: float) -> Delivery:
        keyframe, self.track.keyframe_requested = self.track.keyframe_requested, False
        encode_start = time.perf_counter()
        payloads = await asyncio.to_thread(self.encoder.encode_chunk, frames, keyframe=keyframe)
        encode_end = time.perf_counter()
        chunk = self.track.put(payloads)
        await chunk.done
        return Delivery(
            num_batches=0,
            payload_bytes=sum(map(len, payloads)),
            encode_s=encode_end - encode_start,
            pace_wait_s=chunk.first_left - encode_end,
            write_s=chunk.last_left - chunk.first_left,
            sent_at=chunk.last_left,
        )


# -- media ports -----------------------------------------------------------------------------------


def _ice_connections(pc: RTCPeerConnection) -> list[Any]:
    """The aioice connections that will gather this peer connection's candidates (one when bundled)."""
    transports = [t.sender.transport for t in pc.getTransceivers()] + ([pc.sctp.transport] if pc.sctp else [])
    connections = {id(c): c for c in (t.transport.iceGatherer._connection for t in transports if t is not None)}
    return list(connections.values())


def bind_host_candidates(pc: RTCPeerConnection, ports: range | None, host_addresses: list[str]) -> None:
    """Make ``pc``'s host candidates bind ``host_addresses`` (empty: every interface but loopback,
    as aioice finds them) on a port of ``ports`` (None: any).

    aioice binds host candidates on port 0 and has no setting for it, so each connection's
    candidate gathering is replaced by one that binds the range, lowest free port first; relay
    (TURN) candidates are gathered as before. Server-reflexive (STUN) candidates are not: with a
    fixed range the media ports are known, so a deployment forwards them or uses TURN.
    """
    from aioice.candidate import Candidate, candidate_foundation, candidate_priority
    from aioice.ice import StunProtocol
    from aioice.turn import UDP_SOCKET_BUFFER_SIZE

    for connection in _ice_connections(pc):
        relayed = connection.get_component_candidates

        # aioice calls it as get_component_candidates(component=..., addresses=<its interfaces>)
        async def gather(component: int, addresses: list[str], timeout: int = 5, connection=connection, relayed=relayed):
            loop = asyncio.get_running_loop()
            candidates = []
            for address in host_addresses or addresses:
                for port in ports or (0,):
                    try:
                        transport, protocol = await loop.create_datagram_endpoint(lambda: StunProtocol(connection), local_addr=(address, port))
                        break
                    except OSError:
                        continue
                else:
                    logger.warning("webrtc: no free UDP port for %s in %s (ingress.webrtc_port_min/max)", address, ports)
                    continue
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_SOCKET_BUFFER_SIZE)
                host, bound = transport.get_extra_info("sockname")[:2]
                protocol.local_candidate = Candidate(
                    foundation=candidate_foundation("host", "udp", host),
                    component=component,
                    transport="udp",
                    priority=candidate_priority(component, "host"),
                    host=host,
                    port=bound,
                    type="host",
                )
                connection._protocols.append(protocol)
                candidates.append(protocol.local_candidate)
            return candidates + await relayed(component=component, addresses=[], timeout=timeout)

        connection.get_component_candidates = gather


def _ice_servers(config: IngressConfig) -> list[RTCIceServer]:
    return [RTCIceServer(urls=s.urls, username=s.username, credential=s.credential) for s in config.webrtc_ice_servers]


# -- the session -----------------------------------------------------------------------------------


class WebRTCSession(StreamingSession):
    """One session over a peer connection: the stream's lifecycle from :class:`StreamingSession`,
    frames on a :class:`PacedTrack`, messages on the client's data channel."""

    unstarted_reason = "refused before the answer"

    def __init__(self, offer: Offer, backend: StageBackend, settings: SessionSettings, config: IngressConfig, metrics=None, *, sessions: Slots):
        super().__init__(backend, settings, metrics, sessions=sessions)
        self.offer = offer
        self.config = config
        self.fps = playback_fps(offer.init)
        self.track = PacedTrack(self.fps)
        loop = asyncio.get_running_loop()
        self.answer: asyncio.Future = loop.create_future()  # the answer SDP, or why there is none
        self._channel_ready: asyncio.Future = loop.create_future()
        self._channel_ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._channel = None
        self._answer_sdp = ""
        self._watchdog: asyncio.TimerHandle | None = None
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=_ice_servers(config)))

    # -- negotiation -----------------------------------------------------------------------------

    async def negotiate(self) -> None:
        """Answer the offer (not sent yet: :meth:`run` sends it once the stages hold the session).
        Raises :class:`InvalidInit` for an offer this server cannot answer."""
        pc, video = self.pc, self.offer.video
        sender = pc.addTrack(self.track)
        transceiver = next(t for t in pc.getTransceivers() if t.sender is sender)
        wanted = f"video/{video.codec}".lower()
        transceiver.setCodecPreferences(
            [c for c in RTCRtpSender.getCapabilities("video").codecs if c.mimeType.lower() in (wanted, "video/rtx")]
        )
        # a receiver's keyframe request (PLI/FIR) reaches the encoder: the next chunk starts with one
        request_keyframe = sender._send_keyframe

        def on_keyframe_request() -> None:
            self.track.keyframe_requested = True
            request_keyframe()

        sender._send_keyframe = on_keyframe_request
        pc.on("datachannel", self._on_datachannel)
        pc.on("connectionstatechange", self._on_connection_state)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=self.offer.sdp, type="offer"))
        except Exception as exc:  # aiortc's parse and negotiation errors
            field = "video.codec" if "send parameters" in str(exc) and "video" in str(exc) else "sdp"
            reason = f"the offer has no {video.codec} video the server can send" if field == "video.codec" else f"not an answerable offer: {exc}"
            raise InvalidInit(field, video.codec if field == "video.codec" else f"<{len(self.offer.sdp)} chars>", reason) from None
        if transceiver.mid is None:
            raise InvalidInit("sdp", f"<{len(self.offer.sdp)} chars>", "the offer has no video section to receive the frames on")
        if pc.sctp is None:
            raise InvalidInit("sdp", f"<{len(self.offer.sdp)} chars>", "the offer has no data channel (m=application) for events and chunk_stats")
        config = self.config
        ports = range(config.webrtc_port_min, config.webrtc_port_max + 1) if config.webrtc_port_min else None
        if ports or config.webrtc_host_addresses:
            bind_host_candidates(pc, ports, list(config.webrtc_host_addresses))
        await pc.setLocalDescription(await pc.createAnswer())
        if "a=candidate:" not in pc.localDescription.sdp:
            raise CapacityError(f"no ICE candidate: no free UDP port in {config.webrtc_port_min}..{config.webrtc_port_max} (ingress.webrtc_port_min/max)")
        self._answer_sdp = pc.localDescription.sdp

    def _on_datachannel(self, channel) -> None:
        if self._channel is not None:  # one channel carries the session; others are not read
            return
        self._channel = channel
        channel.on("message", lambda data: self._inbox.put_nowait(data.encode() if isinstance(data, str) else data))
        channel.on("close", lambda: self._gone("data channel closed"))
        if channel.readyState == "open":
            self._on_open()
        else:
            channel.on("open", self._on_open)

    def _on_open(self) -> None:
        if not self._channel_ready.done():
            self._channel_ready.set_result(None)
        if self._watchdog is not None:
            self._watchdog.cancel()

    def _on_connection_state(self) -> None:
        if self.pc.connectionState in ("failed", "closed"):
            self._gone(f"peer connection {self.pc.connectionState}")

    def _gone(self, why: str, error: BaseException | None = None) -> None:
        logger.debug("session %s: %s", self.session_id, why)
        if not self._channel_ready.done():
            self._channel_ready.set_exception(Closed(why))
        self._inbox.put_nowait(error or Closed(why))

    def _connect_timeout(self) -> None:
        if not self._channel_ready.done():
            timeout = self.settings.init_timeout_s
            self._gone("no connection", InitTimeout(f"no data channel open within {timeout:g} s of the answer (ingress.init_timeout_s)"))

    # -- the lifecycle's hooks -------------------------------------------------------------------

    async def _admit(self) -> tuple[InitRequest, SessionSpec, PostOptions | None]:
        # validated with the offer, before the session existed
        if self.metrics:
            self.metrics.init_received(self.offer.received)
        return self.offer.init, self.offer.spec, self.offer.post

    async def _opened(self) -> None:
        self.answer.set_result(self._answer_sdp)
        self._watchdog = asyncio.get_running_loop().call_later(self.settings.init_timeout_s, self._connect_timeout)

    def _frame_output(self, init: InitRequest) -> FrameOutput:
        return WebRTCFrames(self.track, self.offer.video, self.fps)

    def _format_name(self, init: InitRequest) -> str:
        video = self.offer.video
        return f"webrtc/{video.codec}@{video.bitrate // 1000}kbps"

    async def _send(self, message) -> int:
        data = encode_server_message(message)
        await self._channel_ready  # raises Closed if the channel never opened
        if self._channel.readyState != "open":
            raise Closed()
        self._channel.send(data)
        return len(data)

    async def _receive(self) -> bytes:
        item = await self._inbox.get()
        if isinstance(item, BaseException):
            raise item
        limit = self.settings.max_message_bytes
        if len(item) > limit:
            raise MessageTooBig(f"{len(item)} bytes > {limit} (ingress.max_message_bytes)")
        return item

    async def _close(self, code: int, reason: str) -> None:
        """The data channel's close is the session's end (there is no close code): the last
        messages and frames are let out first."""
        channel = self._channel
        if channel is not None and channel.readyState == "open":
            # the channel's stream reset reaches the client after the data sent before it
            channel.close()
            deadline = time.perf_counter() + _FLUSH_S
            while channel.readyState != "closed" and time.perf_counter() < deadline:
                await asyncio.sleep(0.02)
        if code == CloseCode.NORMAL:  # generation complete: the last frame is on its way, not yet shown
            await asyncio.sleep(2 * self.track.interval)
        await self.pc.close()

    async def _end(self, exc: BaseException | None) -> None:
        if not self.answer.done():  # refused before the answer: the HTTP request says why
            self.answer.set_exception(exc or Closed("the session ended before it was answered"))
            return
        await super()._end(exc)

    async def run(self) -> None:
        try:
            await super().run()
        finally:
            if not self.answer.done():  # cancelled before its answer
                self.answer.set_exception(Closed("the session ended before it was answered"))
            if self._watchdog is not None:
                self._watchdog.cancel()
            self.track.stop()
            await asyncio.shield(self.pc.close())


# -- the endpoint ----------------------------------------------------------------------------------


class WebRTCSignalling:
    """``POST /v1/realtime_video/webrtc`` on the ingress's backend, settings and session slots."""

    def __init__(self, backend: StageBackend, settings: SessionSettings, sessions: Slots, config: IngressConfig, *, metrics=None, sessions_open: set, closing=lambda: None):
        """``sessions_open``: the ingress's set of running sessions (each is told to go away when the
        replica stops); ``closing()``: why the replica takes no new session, or None."""
        self.backend, self.settings, self.sessions, self.config = backend, settings, sessions, config
        self.metrics, self.sessions_open, self.closing = metrics, sessions_open, closing

    async def __call__(self, request: Request) -> Response:
        try:
            offer = await read_offer(request, self.settings, self.config)
        except ProtocolError as exc:
            logger.info("webrtc: invalid offer: %s", exc)
            return _status(exc)
        if self.closing() is not None:
            return _status(ServerShutdown(self.closing()))
        session = WebRTCSession(offer, self.backend, self.settings, self.config, self.metrics, sessions=self.sessions)
        try:
            await session.negotiate()
        except Exception as exc:
            await session.pc.close()
            session.track.stop()
            if not isinstance(exc, (ProtocolError, CapacityError)):
                logger.warning("webrtc: could not answer an offer: %r", exc)
            return _status(exc)
        self.sessions_open.add(session)
        task = asyncio.ensure_future(session.run())
        task.add_done_callback(lambda _: self.sessions_open.discard(session))
        await asyncio.sleep(0)  # the session is running: it can be told to go away
        if self.closing() is not None:
            session.go_away(self.closing())
        try:
            sdp = await session.answer
        except Exception as exc:
            return _status(exc)
        body = {"type": "answer", "sdp": sdp, "session_id": session.session_id, "video": offer.video.describe()}
        return Response(msgspec.json.encode(body), media_type="application/json")
