"""The app served in this process by uvicorn on a loopback port, without Ray.

The same ingress and stages as the Ray graph (:func:`build_in_process`): the baseline that
``lingbot-ray bench --vs-inprocess`` compares the graph with, and the server of the ingress and
WebUI tests.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn

from .app import build_in_process
from .config import ServeConfig, load_config
from .ingress import Ingress


@dataclass
class LocalServer:
    address: str  # host:port
    ingress: Ingress

    @property
    def url(self) -> str:
        return f"ws://{self.address}"


@contextlib.contextmanager
def serve_locally(args: dict[str, Any] | ServeConfig, *, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 120.0) -> Iterator[LocalServer]:
    """Serve the app built from ``args`` (the ``args`` of a serve config) until the block exits."""
    ingress = build_in_process(load_config(args))
    if port == 0:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(ingress.asgi, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="lingbot-local-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the in-process server did not start on {host}:{port}")
        time.sleep(0.05)
    try:
        yield LocalServer(f"{host}:{port}", ingress)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
