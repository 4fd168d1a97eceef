"""Stopping the service: SIGINT to a real ``lingbot-ray serve`` process ends a streaming session with
close 1001 and a reason, then the process shuts Serve down and exits (docs/DEPLOYING.md, "Stopping")."""

from __future__ import annotations

import asyncio
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import msgspec
import pytest
import yaml

pytest.importorskip("ray")
websockets = pytest.importorskip("websockets")

from tests.cluster import free_port  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "lingbot_ray" / "webui" / "samples" / "world-bricks.png"


def _wait_ready(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"lingbot-ray serve exited with {process.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"{url} not ready within {timeout_s} s")


def test_sigint_ends_a_streaming_session_with_1001_then_the_service_stops():
    root = tempfile.mkdtemp(prefix="ls")
    port = free_port()
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    path = pathlib.Path(root) / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    log = open(pathlib.Path(root) / "serve.log", "w")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    process = subprocess.Popen(
        [sys.executable, "-m", "lingbot_ray.cli", "serve", str(path), "--temp-dir", os.path.join(root, "ray")],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root,
    )
    try:
        _wait_ready(f"http://127.0.0.1:{port}/v1/models", process, 300)

        async def session():
            async with websockets.connect(f"ws://127.0.0.1:{port}/v1/realtime_video/generate", max_size=None) as ws:
                init = {"type": "init", "prompt": "a street", "first_frame": SAMPLE.read_bytes(), "max_chunks": 10**6}
                await ws.send(msgspec.msgpack.encode(init))
                chunks, errors = 0, []
                try:
                    while True:
                        message = msgspec.msgpack.decode(await asyncio.wait_for(ws.recv(), 120))
                        if message["type"] == "chunk_stats":
                            chunks += 1
                            if chunks == 2:
                                process.send_signal(signal.SIGINT)  # mid-stream, as Ctrl-C would
                        elif message["type"] == "error":
                            errors.append(message["content"])
                except websockets.ConnectionClosed as closed:
                    return chunks, errors, closed.rcvd

        chunks, errors, close = asyncio.run(session())
        assert chunks >= 2
        assert close is not None, "no close frame"
        assert (close.code, close.reason) == (1001, "server shutting down: the service is stopping")
        assert errors == ["server shutting down: the service is stopping"]
        assert process.wait(timeout=120) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
        print((pathlib.Path(root) / "serve.log").read_text()[-3000:])
        shutil.rmtree(root, ignore_errors=True)
