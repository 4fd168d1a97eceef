"""LingBot World 2.0 through a real Ray cluster and a real WebSocket (own temp dir, free port, 4 CPUs).

The served checkpoint is a tiny one in the v2 1.3B release's layout (docs/MODEL.md, "LingBot World
2.0"): only a DiT at the root (``model-*.safetensors`` + ``model.safetensors.index.json``, no
``config.json``), with the text encoder, tokenizer, VAE and scheduler of another folder named by
``shared_components``. Every deployment finds its components through that, the ingress serves the
1.3B's geometry (13, then 16 frames per chunk), and the frames equal the in-process engine's.
"""

from __future__ import annotations

import asyncio
import io
import json
import urllib.request
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch
from PIL import Image

ray = pytest.importorskip("ray")
websockets = pytest.importorskip("websockets")
from ray import serve  # noqa: E402

from lingbot_ray.control.conditions import ConditionQueue  # noqa: E402
from lingbot_ray.engine import RealtimeEngine, SessionSpec  # noqa: E402
from lingbot_ray.serve.app import build_app  # noqa: E402
from lingbot_ray.serve.media import MediaPolicy, load_first_frame  # noqa: E402
from lingbot_ray.transport import FrameDecoder  # noqa: E402
from tests.cluster import serve_cluster  # noqa: E402
from tests.models.v2_layouts import build_shared, build_v2_1p3b  # noqa: E402

APP = "lingbot-v2"
SERVED_NAME = "lingbot-world-v2-1.3b-tiny"
WIDTH, HEIGHT = 64, 48
TIMEOUT_S = 300


def png(size=(180, 110)) -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", size, (40, 110, 190))
    for x in range(0, size[0], 12):  # some structure, so frames are not flat
        image.paste((215, 110, 90), (x, 0, x + 5, size[1]))
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def cluster():
    with serve_cluster("lv", num_cpus=4) as ray_cluster:
        root, port = ray_cluster.root, ray_cluster.port
        shared = build_shared(Path(root) / "shared", width=WIDTH, height=HEIGHT)
        folder = Path(root) / "small"
        build_v2_1p3b(folder, shared=shared, width=WIDTH, height=HEIGHT, served_model_name=SERVED_NAME)
        args = {
            "model": {"path": str(folder), "torch_threads": 1},
            "dit": {"sessions_per_group": 1, "num_cpus_per_rank": 0.5},
            "vae": {"num_cpus": 0.5, "sessions_per_replica": 1},
            "text_encoder": {"num_cpus": 0.1},
            "ingress": {"num_cpus": 0.1, "max_sessions": 1, "stage_timeout_s": TIMEOUT_S},
        }
        serve.run(build_app(args), name=APP, route_prefix="/")
        yield {"url": f"ws://127.0.0.1:{port}/v1/realtime_video/generate", "http": f"http://127.0.0.1:{port}", "folder": folder}


async def _stream(url: str, init: dict):
    """One session to its end: (chunk_stats messages, error messages, decoded frames, close code, reason)."""
    stats, errors, frames = [], [], []
    decoder = FrameDecoder()
    async with websockets.connect(url, max_size=None) as ws:
        await ws.send(msgspec.msgpack.encode(init))
        try:
            while True:
                message = msgspec.msgpack.decode(await asyncio.wait_for(ws.recv(), TIMEOUT_S))
                if message["type"] == "frame_batch":
                    frames.append(decoder.decode(message))
                elif message["type"] == "chunk_stats":
                    stats.append(message)
                else:
                    errors.append(message)
        except websockets.ConnectionClosed as closed:
            return stats, errors, frames, closed.rcvd.code if closed.rcvd else None, closed.rcvd.reason if closed.rcvd else ""


def test_a_v2_1p3b_session_streams_over_a_websocket_as_the_engine_runs_it(cluster):
    with urllib.request.urlopen(cluster["http"] + "/v1/models", timeout=30) as response:
        assert json.loads(response.read())["data"][0]["id"] == SERVED_NAME

    script = [["w"], ["w"], ["j"], ["w", "l"], [], ["d"], ["d"], ["i"]]  # two chunks of 4 latent frames
    init = {
        "type": "init",
        "prompt": "a quiet street",
        "first_frame": png(),
        "max_chunks": 2,
        "seed": 11,
        "realtime_output_format": "raw",
        "condition_inputs": {"camera_actions": script},
    }
    stats, errors, frames, code, reason = asyncio.run(_stream(cluster["url"], init))
    assert (code, reason) == (1000, "generation complete") and not errors, errors
    # the 1.3B's blocks of 4 latent frames: 1 + 4·3, then 4·4 (the session size is the checkpoint's default)
    assert [s["num_frames"] for s in stats] == [13, 16]
    assert [(s["width"], s["height"]) for s in stats] == [(WIDTH, HEIGHT)] * 2
    served = np.concatenate(frames)

    # the same session in this process: bit-exact with the replicas' thread count
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = RealtimeEngine.from_pretrained(cluster["folder"])
        image = load_first_frame(png(), WIDTH, HEIGHT, MediaPolicy())
        state = engine.new_session(SessionSpec(prompt="a quiet street", image=image, width=WIDTH, height=HEIGHT, seed=11))
        queue = ConditionQueue(script)
        local = np.concatenate([engine.step(state, queue.sample(4, i)).frames for i in range(2)])
        engine.close(state)
    finally:
        torch.set_num_threads(threads)
    assert served.shape == local.shape == (29, HEIGHT, WIDTH, 3)
    assert np.array_equal(served, local)
