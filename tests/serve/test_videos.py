"""``POST /v1/videos`` served in-process (real uvicorn, real HTTP and WebSockets, no Ray): a clip is
the WebSocket session's frames bit for bit, events land on their chunk, bad requests get a 4xx
naming the field, and a client that goes away frees the stages."""

from __future__ import annotations

import asyncio
import base64
import email.parser
import http.client
import io
import json
import logging
import time
import urllib.error
import urllib.request

import av
import msgspec
import numpy as np
import pytest
import websockets

from lingbot_ray.models.tiny import build_tiny_checkpoint
from lingbot_ray.serve.local import serve_locally
from tests.serve.test_e2e import collect, png

SCRIPT = [["w"], ["w"], ["l"], ["l", "w"], ["a"], [], ["i"], ["d"], ["w"]]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    checkpoint = tmp_path_factory.mktemp("ckpt") / "tiny"
    build_tiny_checkpoint(checkpoint)
    config = {"model": {"path": str(checkpoint), "torch_threads": 1}, "ingress": {"max_clip_chunks": 8}}
    with serve_locally(config) as srv:
        yield srv


def clip_request(**fields) -> dict:
    request = {"prompt": "a quiet street", "first_frame": png(), "seed": 5, "max_chunks": 3, "size": "64x32",
               "condition_inputs": {"input_types": ["camera_actions"], "camera_actions": SCRIPT}}
    request.update(fields)
    return request


def post(srv, request: dict, *, accept: str | None = None, media_type="application/msgpack"):
    if media_type.endswith("msgpack"):
        body = msgspec.msgpack.encode(request)
    else:  # JSON has no bytes: the image goes as a data URI
        image = request.get("first_frame")
        if isinstance(image, bytes):
            request = {**request, "first_frame": "data:image/png;base64," + base64.b64encode(image).decode()}
        body = json.dumps(request).encode()
    headers = {"Content-Type": media_type, **({"Accept": accept} if accept else {})}
    http_request = urllib.request.Request(f"http://{srv.address}/v1/videos", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(http_request, timeout=300) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read()


def multipart(headers: dict, body: bytes) -> tuple[dict, bytes]:
    """The stats document and the MP4 of a multipart/mixed answer."""
    message = email.parser.BytesParser().parsebytes(b"Content-Type: " + headers["content-type"].encode() + b"\r\n\r\n" + body)
    stats_part, video_part = message.get_payload()
    assert stats_part.get_content_type() == "application/json" and video_part.get_content_type() == "video/mp4"
    return json.loads(stats_part.get_payload(decode=True)), video_part.get_payload(decode=True)


def decode_mp4(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def test_a_lossless_clip_is_the_websocket_sessions_frames_bit_for_bit(server):
    status, headers, body = post(server, clip_request(lossless=True))
    assert status == 200 and headers["content-type"] == "video/mp4", (status, body[:300])
    summary = json.loads(headers["x-lingbot-clip"])
    clip = decode_mp4(body)
    assert summary["chunks"] == 3 and summary["frames"] == len(clip) and clip.shape[1:] == (32, 64, 3)

    async def live():
        async with websockets.connect(f"ws://{server.address}/v1/realtime_video/generate", max_size=None) as ws:
            init = {"type": "init", **clip_request(), "realtime_output_format": "raw"}
            await ws.send(msgspec.msgpack.encode(init))
            return await collect(ws)

    _, stats, errors, code, _, frames = asyncio.run(live())
    assert code == 1000 and not errors and len(stats) == 3
    assert np.array_equal(np.concatenate(frames), clip)


def test_events_apply_at_their_chunk_and_the_mp4_plays_at_the_sessions_fps(server):
    plain = decode_mp4(post(server, clip_request(lossless=True, condition_inputs=None))[2])
    status, headers, body = post(
        server, clip_request(lossless=True, condition_inputs=None, fps=12,
                             events=[{"at_chunk": 2, "kind": "camera_actions", "payload": [["j"]] * 6}]),
        accept="multipart/mixed",
    )
    assert status == 200, body[:300]
    document, video = multipart(headers, body)
    steered = decode_mp4(video)
    before = sum(chunk["frames"] for chunk in document["chunk_stats"][:2])
    assert np.array_equal(steered[:before], plain[:before])  # before the event's chunk: the same
    assert not np.array_equal(steered[before:], plain[before:])  # from its chunk on: turned
    with av.open(io.BytesIO(video)) as container:
        assert container.streams.video[0].average_rate == 12


def test_multipart_answer_carries_every_chunks_stats_then_the_mp4(server):
    status, headers, body = post(server, clip_request(max_chunks=2), accept="multipart/mixed", media_type="application/json")
    assert status == 200 and headers["content-type"].startswith("multipart/mixed"), body[:300]
    document, video = multipart(headers, body)
    assert [s["chunk_index"] for s in document["chunk_stats"]] == [0, 1]
    assert all(s["dit_ms"] >= 0 and s["frames"] > 0 for s in document["chunk_stats"])
    assert len(decode_mp4(video)) == document["frames"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"max_chunks": None}, "max_chunks"),
        ({"max_chunks": 9}, "max_chunks"),
        ({"size": "65x32"}, "size"),
        ({"events": [{"at_chunk": 3, "kind": "prompt", "payload": "x"}]}, "events[0].at_chunk"),
        ({"events": [{"at_chunk": 0, "kind": "dance", "payload": "x"}]}, "events[0].kind"),
        ({"lossless": "yes"}, "lossless"),
        ({"first_frame": "/etc/passwd"}, "first_frame"),
    ],
)
def test_a_bad_request_is_a_4xx_naming_the_field(server, change, field):
    request = clip_request(**change)
    request = {key: value for key, value in request.items() if value is not None}
    status, _, body = post(server, request)
    error = json.loads(body)["error"]
    assert status == 400 and error["message"] == "invalid generate request" and error["param"] == field, error


def test_a_body_that_is_not_a_clip_request_is_a_400(server):
    for media_type, body in (("text/plain", b"hello"), ("application/json", b"{not json"), ("application/json", b"[1, 2]")):
        request = urllib.request.Request(f"http://{server.address}/v1/videos", data=body, headers={"Content-Type": media_type}, method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        error = json.loads(refused.value.read())["error"]
        assert refused.value.code == 400 and error["param"] in ("content-type", "body"), error


def test_a_client_that_goes_away_frees_the_stages(server, caplog):
    caplog.set_level(logging.INFO, logger="ray.serve")
    logging.getLogger("ray.serve").addHandler(caplog.handler)  # Ray's logger does not propagate
    ingress = server.ingress
    dit = ingress.backend.chain.dit
    host, port = server.address.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    body = msgspec.msgpack.encode(clip_request(max_chunks=8, size="320x192"))
    connection.request("POST", "/v1/videos", body=body, headers={"Content-Type": "application/msgpack"})
    deadline = time.monotonic() + 60
    while not dit.held and time.monotonic() < deadline:  # the clip holds its DiT slot
        time.sleep(0.05)
    assert dit.held and ingress.sessions.used == 1
    connection.sock.close()  # gone, without reading the answer
    deadline = time.monotonic() + 60
    while (dit.held or ingress.sessions.used) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not dit.held and ingress.sessions.used == 0
    ends = [r.getMessage() for r in caplog.records if r.getMessage().startswith("clip ")]
    logging.getLogger("ray.serve").removeHandler(caplog.handler)
    assert len(ends) == 1 and "(client went away)" in ends[0] and " 8 chunk(s)" not in ends[0], ends
