"""``POST /v1/realtime_video/webrtc`` served in-process (real uvicorn, real HTTP, a real aiortc peer on
loopback, no Ray): the video track carries the session's frames, the data channel its events and
``chunk_stats``, bad offers get a 400 naming the field, a full server a 503, and closing the peer
connection or the data channel (or never connecting) frees every slot."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.error
import urllib.request

import av
import msgspec
import numpy as np
import pytest
import websockets

pytest.importorskip("aiortc", reason="WebRTC needs aiortc (pip install aiortc)")
from aiortc import RTCPeerConnection, RTCSessionDescription  # noqa: E402

from lingbot_ray.models.tiny import build_tiny_checkpoint  # noqa: E402
from lingbot_ray.serve.local import serve_locally  # noqa: E402
from lingbot_ray.serve.webrtc import VideoEncoder, Video, bind_host_candidates  # noqa: E402
from tests.serve.test_e2e import collect, init_message, png  # noqa: E402

KEY = "webrtc-key"
PORTS = (47310, 47349)
INIT_TIMEOUT_S = 3.0
SIZE = "64x32"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    checkpoint = tmp_path_factory.mktemp("ckpt") / "tiny"
    build_tiny_checkpoint(checkpoint)
    config = {
        "model": {"path": str(checkpoint), "torch_threads": 1},
        # one DiT slot: a second session is refused by the stages, with the ingress slots free
        "dit": {"sessions_per_group": 1},
        "ingress": {
            "api_key": KEY,
            "max_sessions": 2,
            "init_timeout_s": INIT_TIMEOUT_S,
            "webrtc_port_min": PORTS[0],
            "webrtc_port_max": PORTS[1],
            # loopback only, here and in the test's peer: the test needs no network interface
            "webrtc_host_addresses": ["127.0.0.1"],
        },
    }
    with serve_locally(config) as srv:
        yield srv


def init(**fields) -> dict:
    return {"prompt": "a quiet street", "first_frame": png(), "size": SIZE, "seed": 3, **fields}


def post(srv, body: dict, *, key: str | None = KEY, media_type: str = "application/msgpack"):
    data = msgspec.msgpack.encode(body) if media_type.endswith("msgpack") else json.dumps(body).encode()
    headers = {"Content-Type": media_type, **({"x-api-key": key} if key else {})}
    request = urllib.request.Request(f"http://{srv.address}/v1/realtime_video/webrtc", data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}, json.loads(error.read())


class Peer:
    """The client side: a receive-only video transceiver and one data channel, as the WebUI offers."""

    def __init__(self):
        self.pc = RTCPeerConnection()
        self.pc.addTransceiver("video", direction="recvonly")
        self.channel = self.pc.createDataChannel("lingbot")
        bind_host_candidates(self.pc, None, ["127.0.0.1"])
        self.messages: list[dict] = []
        self.frames: list[np.ndarray] = []
        self.opened, self.closed = asyncio.Event(), asyncio.Event()
        self.channel.on("open", self.opened.set)
        self.channel.on("close", self.closed.set)
        self.channel.on("message", lambda data: self.messages.append(msgspec.msgpack.decode(data)))
        self.pc.on("track", lambda track: asyncio.ensure_future(self._read(track)))

    async def _read(self, track) -> None:
        try:
            while True:
                self.frames.append((await track.recv()).to_ndarray(format="rgb24"))
        except Exception:  # MediaStreamError: the track ended
            pass

    async def offer(self, srv, session: dict, **extra):
        await self.pc.setLocalDescription(await self.pc.createOffer())
        body = {"type": "offer", "sdp": self.pc.localDescription.sdp, "init": session, **extra}
        return await asyncio.to_thread(post, srv, body)

    async def start(self, srv, session: dict, **extra) -> dict:
        status, _, answer = await self.offer(srv, session, **extra)
        assert status == 200, answer
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        await asyncio.wait_for(self.opened.wait(), 30)
        return answer

    def stats(self) -> list[dict]:
        return [m for m in self.messages if m["type"] == "chunk_stats"]

    async def until(self, predicate, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.05)


def slots_free(srv) -> bool:
    chain = srv.ingress.backend.chain
    return srv.ingress.sessions.used == 0 and not chain.dit.held and not chain.vae.held and not srv.ingress.drivers


async def until_free(srv, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not slots_free(srv):
        assert time.monotonic() < deadline, srv.ingress.describe()
        await asyncio.sleep(0.05)


def websocket_frames(srv, **fields) -> np.ndarray:
    async def run():
        url = f"ws://{srv.address}/v1/realtime_video/generate?api_key={KEY}"
        async with websockets.connect(url, max_size=None) as ws:
            await ws.send(init_message(**init(realtime_output_format="raw", **fields)))
            *_, frames = await collect(ws)
        return frames

    return np.concatenate(asyncio.run(run()))


def test_frames_arrive_as_video_and_the_event_id_comes_back_in_chunk_stats(server):
    reference = websocket_frames(server, max_chunks=1)  # chunk 0: sampled before any event can land

    async def scenario():
        peer = Peer()
        answer = await peer.start(server, init(max_chunks=3), video={"codec": "VP8", "bitrate": 800_000})
        ports = [int(p) for p in re.findall(r"a=candidate:\S+ 1 udp \d+ \S+ (\d+) typ host", answer["sdp"])]
        assert ports and all(PORTS[0] <= p <= PORTS[1] for p in ports), ports
        assert answer["video"] == {"codec": "VP8", "bitrate": 800_000, "keyframe_interval_s": 2.0}
        peer.channel.send(msgspec.msgpack.encode(
            {"type": "event", "kind": "camera_actions", "event_id": 7,
             "payload": {"mode": "state", "transitions": [{"actions": ["j"]}]}}))
        peer.channel.send(b"not msgpack")  # an invalid event: an error comes back, the session goes on
        await asyncio.wait_for(peer.closed.wait(), 60)  # max_chunks: the server closes the channel
        await peer.pc.close()
        return peer, answer

    peer, answer = asyncio.run(scenario())
    stats = peer.stats()
    assert [s["chunk_index"] for s in stats] == [0, 1, 2]
    assert all(s["session_id"] == answer["session_id"] and s["content_type"] == "video/VP8" for s in stats)
    assert all(s["num_batches"] == 0 and s["ws_payload_bytes"] > 0 and s["fps"] == 16.0 for s in stats)
    assert stats[0]["event_id"] is None and stats[-1]["event_id"] == 7
    errors = [m for m in peer.messages if m["type"] == "error"]
    assert [e["content"] for e in errors] == ["invalid event"]
    # the video is the session's frames through the encoder: those frames encoded here with the
    # same settings decode to the same pixels
    sent = sum(s["num_frames"] for s in stats)
    assert sent - 2 <= len(peer.frames) <= sent  # aiortc's receiver holds the last frame back
    encoder = VideoEncoder(Video("VP8", 800_000, 2.0), fps=16)
    decoder = av.CodecContext.create("vp8", "r")
    here = np.stack([decoder.decode(av.Packet(p))[0].to_ndarray(format="rgb24") for p in encoder.encode_chunk(reference)])
    got = np.stack(peer.frames[: len(reference)])
    assert got.shape == reference.shape == (stats[0]["num_frames"], 32, 64, 3)
    np.testing.assert_array_equal(got, here)
    error = np.abs(got.astype(int) - reference).mean()  # the codec's loss, far below a frame's change
    assert error < 12 and 2 * error < np.abs(got[1:].astype(int) - reference[:-1]).mean(), error
    asyncio.run(until_free(server))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"init": init(size="65x32")}, "size"),
        ({"init": {"prompt": "no first frame"}}, "first_frame"),
        ({"init": None}, "init"),
        ({"sdp": ""}, "sdp"),
        ({"sdp": "v=0\r\nnot an offer\r\n"}, "sdp"),
        ({"type": "answer"}, "type"),
        ({"video": {"codec": "AV1"}}, "video.codec"),
        ({"video": {"bitrate": 10}}, "video.bitrate"),
        ({"video": {"colour": "red"}}, "video"),
    ],
)
def test_a_bad_offer_gets_a_400_naming_the_field(server, change, field):
    body = {"type": "offer", "sdp": "v=0\r\n", "init": init(), **change}
    if "sdp" not in change:  # a real offer, so that only the field under test is wrong
        async def offer():
            pc = RTCPeerConnection()
            pc.addTransceiver("video", direction="recvonly")
            pc.createDataChannel("lingbot")
            await pc.setLocalDescription(await pc.createOffer())
            await pc.close()
            return pc.localDescription.sdp

        body["sdp"] = asyncio.run(offer())
    status, _, answer = post(server, body)
    assert status == 400, answer
    assert answer["error"]["message"] == "invalid generate request" and answer["error"]["param"].startswith(field), answer
    assert slots_free(server)


def test_the_api_key_applies(server):
    status, _, answer = post(server, {"type": "offer", "sdp": "v=0", "init": init()}, key=None)
    assert status == 401 and answer["error"]["type"] == "authentication_error"


def test_an_offer_without_a_data_channel_or_video_is_refused(server):
    async def offer(video: bool, channel: bool):
        pc = RTCPeerConnection()
        if video:
            pc.addTransceiver("video", direction="recvonly")
        if channel:
            pc.createDataChannel("lingbot")
        await pc.setLocalDescription(await pc.createOffer())
        await pc.close()
        return post(server, {"type": "offer", "sdp": pc.localDescription.sdp, "init": init()})

    for video, channel, reason in [(True, False, "data channel"), (False, True, "video")]:
        status, _, answer = asyncio.run(offer(video, channel))
        assert status == 400 and answer["error"]["param"] == "sdp" and reason in answer["error"]["detail"], answer
    assert slots_free(server)


def test_a_full_server_gets_503_and_closing_the_peer_or_the_channel_frees_every_slot(server):
    async def scenario():
        first = Peer()
        await first.start(server, init())  # continuous
        await first.until(lambda: first.stats())
        assert server.ingress.sessions.used == 1 and server.ingress.backend.chain.dit.held

        # the stages are full (one DiT slot): refused with 503, nothing held for it
        second = Peer()
        status, headers, answer = await second.offer(server, init())
        assert status == 503 and answer["error"]["message"].startswith("no capacity"), answer
        assert headers.get("retry-after") == "5"
        # the ingress is full: the same
        server.ingress.sessions.limit = 1
        try:
            status, _, answer = await Peer().offer(server, init())
            assert status == 503 and "ingress" in answer["error"]["message"], answer
        finally:
            server.ingress.sessions.limit = 2
        assert server.ingress.sessions.used == 1

        await first.pc.close()  # the peer connection goes: the session ends
        await until_free(server)

        third = Peer()
        await third.start(server, init())
        await third.until(lambda: third.stats())
        third.channel.close()  # only the data channel goes: the session ends too
        await until_free(server)
        await third.pc.close()
        for peer in (second,):
            await peer.pc.close()

    asyncio.run(scenario())


def test_an_answer_never_used_frees_every_slot_after_the_init_timeout(server):
    async def scenario():
        peer = Peer()
        status, _, answer = await peer.offer(server, init())
        assert status == 200
        assert server.ingress.sessions.used == 1  # held: the answer went out
        started = time.monotonic()
        await until_free(server, timeout=INIT_TIMEOUT_S + 30)
        assert time.monotonic() - started >= INIT_TIMEOUT_S - 1.0
        await peer.pc.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("codec", ["VP8", "H264"])
def test_the_encoder_makes_a_keyframe_at_the_interval_and_on_request(codec):
    import av

    # a pattern that drifts a pixel a frame: no scene cut for the encoder to key on
    x = np.arange(64 + 10)
    row = (128 + 100 * np.sin(x / 5)).astype(np.uint8)
    frames = np.stack([np.broadcast_to(row[i : i + 64, None], (64, 3))[None].repeat(32, 0) for i in range(10)])
    encoder = VideoEncoder(Video(codec, 500_000, keyframe_interval_s=0.25), fps=16)  # every 4 frames
    payloads = encoder.encode_chunk(frames) + encoder.encode_chunk(frames[:3], keyframe=True)
    decoder = av.CodecContext.create("vp8" if codec == "VP8" else "h264", "r")
    keys = []
    for payload in payloads:
        packet = av.Packet(payload)
        keys.append(bool(decoder.decode(packet)[0].key_frame))
    assert keys == [True, False, False, False, True, False, False, False, True, False, True, False, False]


def test_shutting_down_tells_a_webrtc_session_and_refuses_new_offers(tmp_path):
    """``Ingress.shut_down_sessions`` ends a streaming WebRTC session like a socket: the error on its
    data channel, then the channel closes; an offer that comes afterwards gets a 503."""
    checkpoint = tmp_path / "tiny"
    build_tiny_checkpoint(checkpoint)
    config = {"model": {"path": str(checkpoint), "torch_threads": 1}, "ingress": {"webrtc_host_addresses": ["127.0.0.1"]}}
    with serve_locally(config) as srv:
        ingress = srv.ingress

        async def scenario():
            peer = Peer()
            await peer.start(srv, init())
            await peer.until(lambda: peer.stats())
            loop = next(iter(ingress.drivers))._task.get_loop()  # the server's event loop
            told = asyncio.run_coroutine_threadsafe(ingress.shut_down_sessions("maintenance"), loop)
            await asyncio.wait_for(peer.closed.wait(), 30)
            summary = await asyncio.wrap_future(told)
            status, _, late = await Peer().offer(srv, init())
            await peer.pc.close()
            return peer, summary, status, late

        peer, summary, status, late = asyncio.run(scenario())
        assert slots_free(srv)
    assert summary["ended"] == 1 and summary["open"] == 0, summary
    assert peer.messages[-1] == {"type": "error", "content": "server shutting down: maintenance"}
    assert status == 503 and late["error"]["message"] == "server shutting down: maintenance", late
