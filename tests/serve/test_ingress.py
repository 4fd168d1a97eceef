"""The ingress served in-process (real uvicorn, real WebSockets, no Ray): API key, CORS, limits."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import msgspec
import pytest
import uvicorn
import websockets

from lingbot_ray.models.tiny import build_tiny_checkpoint
from lingbot_ray.serve.app import build_in_process
from lingbot_ray.serve.config import load_config
from tests.serve.test_e2e import collect, init_message

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    checkpoint = tmp_path_factory.mktemp("ckpt") / "tiny"
    build_tiny_checkpoint(checkpoint)
    config = load_config(
        {
            "model": {"path": str(checkpoint), "torch_threads": 1},
            "dit": {"sessions_per_group": 4},
            "ingress": {"api_key": KEY, "max_sessions": 1, "cors_allow_origins": ["http://webui.example"]},
        }
    )
    ingress = build_in_process(config)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(ingress.asgi, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.05)
    yield f"127.0.0.1:{port}"
    uv.should_exit = True
    thread.join(timeout=10)


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

    async def open_first():
        # the previous test's session frees its slot just after its client saw the close
        deadline = time.monotonic() + 30
        while True:
            first = await websockets.connect(url, max_size=None)
            await first.send(init_message(max_chunks=None, realtime_output_format="raw"))
            _, stats, _, code, _, _ = await collect(first, stop_after_chunks=1)
            if stats:
                return first
            assert code == 1013 and time.monotonic() < deadline, code
            await asyncio.sleep(0.2)

    async def scenario():
        async with await open_first() as first:
            async with websockets.connect(url, max_size=None) as second:
                refused = await collect(second)  # refused on arrival, before any message
            await first.send(msgspec.msgpack.encode({"type": "event", "kind": "prompt", "payload": "still here"}))
            still_streaming = await collect(first, stop_after_chunks=1)
        return refused, still_streaming

    refused, still_streaming = asyncio.run(scenario())
    assert refused[3] == 1013 and "no capacity" in refused[2][0]["content"]
    assert len(still_streaming[1]) == 1  # the live session kept streaming
