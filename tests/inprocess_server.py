"""The ingress served in-process by a real uvicorn on a free loopback port (no Ray)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass

import uvicorn

from lingbot_ray.serve.app import build_in_process
from lingbot_ray.serve.config import load_config
from lingbot_ray.serve.ingress import Ingress


@dataclass
class InProcessServer:
    address: str  # host:port
    ingress: Ingress


@contextlib.contextmanager
def serve_in_process(config: dict):
    ingress = build_in_process(load_config(config))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(ingress.asgi, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the in-process server did not start")
        time.sleep(0.05)
    try:
        yield InProcessServer(f"127.0.0.1:{port}", ingress)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
