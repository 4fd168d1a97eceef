"""The ingress served in-process (real uvicorn, real WebSockets, no Ray): API key, CORS, limits."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.error
import urllib.request

import msgspec
import pytest
import websockets

from lingbot_ray.models.tiny import build_tiny_checkpoint
from lingbot_ray.serve.local import serve_locally
from tests.serve.test_e2e import collect, init_message

KEY = "s3cret-key"
INIT_TIMEOUT_S = 4.0


class _Address(str):
    """host:port, carrying the in-process ingress so a test can look inside the stages."""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    checkpoint = tmp_path_factory.mktemp("ckpt") / "tiny"
    build_tiny_checkpoint(checkpoint)
    config = {
        "model": {"path": str(checkpoint), "torch_threads": 1},
        "dit": {"sessions_per_group": 4},
        "ingress": {
            "api_key": KEY,
            "max_sessions": 1,
            "cors_allow_origins": ["http://webui.example"],
            "max_pending_inits": 2,
            "init_timeout_s": INIT_TIMEOUT_S,
            "max_message_bytes": 2**20,
        },
    }
    with serve_locally(config) as srv:
        address = _Address(srv.address)
        address.ingress = srv.ingress
        yield address


async def open_when_free(url, *, small_receive_buffer=False, **init_fields):
    """Open a session, retrying while the 1-session ingress still frees the previous test's one
    (its slot is released just after that client saw its close)."""
    deadline = time.monotonic() + 30
    while True:
        sock = None
        if small_receive_buffer:  # so that kernel buffering does not hide backpressure for long
            host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
            sock.connect((host, int(port)))
        ws = await websockets.connect(url, max_size=None, max_queue=1, sock=sock)
        try:
            await ws.send(init_message(**init_fields))
        except websockets.ConnectionClosed:
            pass  # refused on arrival; collect() reads the close code
        _, stats, _, code, _, _ = await collect(ws, stop_after_chunks=1)
        if stats:
            return ws
        assert code == 1013 and time.monotonic() < deadline, code
        await asyncio.sleep(0.2)


def get(url, headers=None):
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, dict(response.headers), json.loads(response.read())


def test_http_endpoints_need_the_key_by_header_bearer_or_query(server):
    base = f"http://{server}/v1/models"
    with pytest.raises(urllib.error.HTTPError) as refused:
        get(base)
    assert refused.value.code == 401
    with pytest.raises(urllib.error.HTTPError):
        get(base, {"x-api-key": "wrong"})
    assert get(base, {"x-api-key": KEY})[0] == 200
    assert get(base, {"Authorization": f"Bearer {KEY}"})[0] == 200
    assert get(f"{base}?api_key={KEY}")[0] == 200


def test_webui_page_is_public_and_a_401_is_readable_cross_origin(server):
    request = urllib.request.Request(f"http://{server}/")
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200 and b"<html" in response.read().lower()
    with pytest.raises(urllib.error.HTTPError) as refused:
        get(f"http://{server}/v1/models", {"Origin": "http://webui.example"})
    assert refused.value.code == 401
    assert refused.value.headers.get("access-control-allow-origin") == "http://webui.example"


def test_cors_allows_the_configured_origin_only(server):
    _, headers, _ = get(f"http://{server}/v1/models?api_key={KEY}", {"Origin": "http://webui.example"})
    assert headers.get("access-control-allow-origin") == "http://webui.example"
    _, headers, _ = get(f"http://{server}/v1/models?api_key={KEY}", {"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in {k.lower() for k in headers}


def test_websocket_without_key_is_closed_1008(server):
    async def attempt(query, send=True):
        async with websockets.connect(f"ws://{server}/v1/realtime_video/generate{query}", max_size=None) as ws:
            if send:
                await ws.send(init_message())
            return await collect(ws)

    _, _, errors, code, _, _ = asyncio.run(attempt("", send=False))  # refused before any message
    assert code == 1008 and "API key" in errors[0]["content"]
    _, stats, errors, code, reason, _ = asyncio.run(attempt(f"?api_key={KEY}"))
    assert (code, reason) == (1000, "generation complete") and len(stats) == 2 and not errors


def test_sessions_beyond_the_ingress_limit_are_refused_1013(server):
    url = f"ws://{server}/v1/realtime_video/generate?api_key={KEY}"

    async def scenario():
        async with await open_when_free(url, max_chunks=None, realtime_output_format="raw") as first:
            async with websockets.connect(url, max_size=None) as second:
                await second.send(init_message())  # a socket takes a session slot with a valid init
                refused = await collect(second)
            await first.send(msgspec.msgpack.encode({"type": "event", "kind": "prompt", "payload": "still here"}))
            still_streaming = await collect(first, stop_after_chunks=1)
        return refused, still_streaming

    refused, still_streaming = asyncio.run(scenario())
    assert refused[3] == 1013 and "no capacity" in refused[2][0]["content"]
    assert len(still_streaming[1]) == 1  # the live session kept streaming


def test_a_slow_client_pauses_generation(server):
    """Nothing grows without bound: with the client not reading, the DiT stops within a bounded
    number of chunks (the chunks in flight plus what the sockets buffer) and resumes on reading."""
    dit = server.ingress.backend.chain.dit
    url = f"ws://{server}/v1/realtime_video/generate?api_key={KEY}"

    def generated() -> int:
        return sum(state.next_frame for state in list(dit.host.sessions.values())) // 3

    async def scenario():
        async with await open_when_free(url, small_receive_buffer=True, max_chunks=None, realtime_output_format="raw") as ws:
            samples = []
            for _ in range(36):  # stop reading for 18 s; the server's send buffer still absorbs a few MB
                await asyncio.sleep(0.5)
                samples.append(generated())
            # chunks 0..N-1 were generated before the stall; reading on must bring chunk N
            resumed = await collect(ws, stop_after_chunks=samples[-1])
            return samples, resumed

    samples, resumed = asyncio.run(scenario())
    assert samples[-1] == samples[-11], f"still generating while the client does not read: {samples}"
    assert samples[-1] < 40, samples  # bounded, far below what 8 s of free running would make
    assert resumed[1][-1]["chunk_index"] == samples[-1], "generation did not resume once the client read"


def test_post_processing_without_configured_weights_is_an_invalid_init_naming_the_setting(server):
    async def attempt():
        deadline = time.monotonic() + 30
        while True:  # the previous test's session may still hold the one slot for a moment
            async with websockets.connect(f"ws://{server}/v1/realtime_video/generate?api_key={KEY}", max_size=None) as ws:
                try:
                    await ws.send(init_message(enable_upscaling=True))
                    reply = msgspec.msgpack.decode(await ws.recv())
                    if not reply["content"].startswith("no capacity"):
                        return reply
                except websockets.ConnectionClosed as closed:
                    assert closed.rcvd.code == 1013
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)

    error = asyncio.run(attempt())
    assert error["content"] == "invalid generate request"
    assert "enable_upscaling" in error["detail"] and "postprocess.esrgan_model_path" in error["detail"]


def test_sockets_without_init_hold_no_session_slot_and_are_closed_after_the_init_timeout(server):
    """Idle sockets cannot deny service: they wait outside the session slots, only up to
    ``max_pending_inits`` at once (more are refused 1013 on arrival), and each for at most
    ``init_timeout_s`` (then 1008 with the reason)."""
    url = f"ws://{server}/v1/realtime_video/generate?api_key={KEY}"

    async def scenario():
        idle = [(await websockets.connect(url, max_size=None), time.monotonic())]
        # the one session slot is free for a real client while a socket idles
        streaming = await open_when_free(url, max_chunks=2, realtime_output_format="raw")
        session = await collect(streaming)
        refused = None
        for _ in range(3):  # two wait at most: the first idle one may have timed out meanwhile
            connecting = time.monotonic()  # before the server's init timer starts
            ws = await websockets.connect(url, max_size=None)
            try:
                told = msgspec.msgpack.decode(await asyncio.wait_for(ws.recv(), 0.5))  # a refused socket is told at once
            except asyncio.TimeoutError:
                idle.append((ws, connecting))
                continue
            refused = (told, await collect(ws))
            break
        idle_ends = []
        for ws, since in idle:
            idle_ends.append((await collect(ws), time.monotonic() - since))
        return refused, session, idle_ends

    refused, session, idle_ends = asyncio.run(scenario())
    assert session[3] == 1000 and len(session[1]) == 1, session[3:5]  # the first chunk was read by open_when_free
    assert refused and refused[1][3] == 1013 and "waiting for init 2/2" in refused[0]["content"], refused
    for (_, _, errors, code, reason, _), held in idle_ends:
        assert code == 1008 and reason.startswith("init timeout") and "ingress.init_timeout_s" in errors[0]["content"]
    assert INIT_TIMEOUT_S - 0.05 < idle_ends[-1][1] < INIT_TIMEOUT_S + 5, idle_ends[-1][1]


def test_an_inbound_message_over_the_limit_closes_1009(server):
    url = f"ws://{server}/v1/realtime_video/generate?api_key={KEY}"

    async def scenario():
        async with websockets.connect(url, max_size=None) as ws:
            await ws.send(init_message(padding=b"x" * (2**20 + 1)))  # unknown keys are ignored, size is not
            return await collect(ws)

    _, _, errors, code, reason, _ = asyncio.run(scenario())
    assert code == 1009 and reason.startswith("message too big"), (code, reason)
    assert "ingress.max_message_bytes" in errors[0]["content"]


def test_shutting_down_ends_every_socket_with_1001_in_any_phase(tmp_path):
    """``Ingress.shut_down_sessions`` (what ``lingbot-ray serve`` calls on SIGINT): a streaming
    session and a socket still waiting for init both get the error and close 1001 with the reason,
    and a socket that opens afterwards gets the same at once."""
    checkpoint = tmp_path / "tiny"
    build_tiny_checkpoint(checkpoint)
    with serve_locally({"model": {"path": str(checkpoint), "torch_threads": 1}}) as srv:
        url = f"ws://{srv.address}/v1/realtime_video/generate"
        ingress = srv.ingress

        async def scenario():
            waiting = await websockets.connect(url, max_size=None)
            streaming = await websockets.connect(url, max_size=None)
            await streaming.send(init_message(max_chunks=10**6, realtime_output_format="raw"))
            while msgspec.msgpack.decode(await streaming.recv())["type"] != "chunk_stats":
                pass
            assert len(ingress.drivers) == 2
            loop = next(iter(ingress.drivers))._task.get_loop()  # the server's event loop
            told = asyncio.run_coroutine_threadsafe(ingress.shut_down_sessions("maintenance"), loop)
            ends = [await collect(streaming), await collect(waiting)]
            summary = await asyncio.wrap_future(told)
            late = await websockets.connect(url, max_size=None)
            ends.append(await collect(late))
            return ends, summary

        ends, summary = asyncio.run(scenario())
    assert summary["ended"] == 2 and summary["open"] == 0, summary
    for _, _, errors, code, reason, _ in ends:
        assert (code, reason) == (1001, "server shutting down: maintenance")
        assert errors[-1]["content"] == "server shutting down: maintenance"
