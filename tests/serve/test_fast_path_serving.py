"""The fast-path settings through a real Ray cluster and a real WebSocket (own temp dir, free port):
``model.attention_backend: native``, ``dit.fp8: rowwise``, ``dit.compile: default`` and
``vae.decoder: tiny``, all at once, on a tiny checkpoint with a tiny decoder in its ``tiny_decoder/``
folder. The frames match the same settings run in this process, eagerly (compiling reorders float
sums: within 2 uint8 levels, as tests/engine/test_fastpath.py states)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")
websockets = pytest.importorskip("websockets")
from ray import serve  # noqa: E402

from lingbot_ray.control.conditions import ConditionQueue  # noqa: E402
from lingbot_ray.engine import RealtimeEngine, SessionSpec  # noqa: E402
from lingbot_ray.engine.fastpath import use_attention_backend, use_fp8  # noqa: E402
from lingbot_ray.engine.stages import VAEStage  # noqa: E402
from lingbot_ray.models.tiny import build_tiny_checkpoint  # noqa: E402
from lingbot_ray.models.tiny_decoder import TinyAutoencoder, TinyDecoderConfig, save_tiny_autoencoder  # noqa: E402
from lingbot_ray.serve.app import build_app  # noqa: E402
from lingbot_ray.serve.media import MediaPolicy, load_first_frame  # noqa: E402
from tests.cluster import serve_cluster  # noqa: E402
from tests.serve.test_v2_serving import _stream, png  # noqa: E402

APP = "lingbot-fast"
WIDTH, HEIGHT = 64, 48
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def cluster():
    with serve_cluster("lf", num_cpus=4) as ray_cluster:
        folder = build_tiny_checkpoint(Path(ray_cluster.root) / "tiny", width=WIDTH, height=HEIGHT)
        torch.manual_seed(0)
        save_tiny_autoencoder(TinyAutoencoder(TinyDecoderConfig(decoder_widths=(32, 16, 8, 8), encoder_width=8)), folder / "tiny_decoder")
        args = {
            "model": {"path": str(folder), "torch_threads": 1, "attention_backend": "native"},
            "dit": {"sessions_per_group": 1, "num_cpus_per_rank": 0.5, "fp8": "rowwise", "compile": "default"},
            "vae": {"num_cpus": 0.5, "sessions_per_replica": 1, "decoder": "tiny"},
            "text_encoder": {"num_cpus": 0.1},
            "ingress": {"num_cpus": 0.1, "max_sessions": 1, "stage_timeout_s": TIMEOUT_S},
        }
        serve.run(build_app(args), name=APP, route_prefix="/")
        yield {"url": f"ws://127.0.0.1:{ray_cluster.port}/v1/realtime_video/generate", "folder": folder}


def test_fp8_compiled_dit_and_tiny_decoder_serve_a_session_as_the_engine_runs_them(cluster):
    script = [["w"], ["w"], ["j"], ["l"], [], ["d"], ["i"], [], ["s"]]  # three chunks of 3 latent frames
    init = {
        "type": "init", "prompt": "a quiet street", "first_frame": png(), "max_chunks": 3, "seed": 5,
        "realtime_output_format": "raw", "condition_inputs": {"camera_actions": script},
    }  # fmt: skip
    stats, errors, frames, code, reason = asyncio.run(_stream(cluster["url"], init))
    assert (code, reason) == (1000, "generation complete") and not errors, errors
    assert [s["num_frames"] for s in stats] == [9, 12, 12]  # the tiny decoder keeps the Wan VAE's frame count
    served = np.concatenate(frames)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = RealtimeEngine.from_pretrained(cluster["folder"])
        use_attention_backend(engine.dit, "native")
        assert use_fp8(engine.dit, "rowwise") > 0
        tiny = VAEStage.from_pretrained(cluster["folder"], decoder="tiny")
        engine = RealtimeEngine(engine.text, engine.dit, tiny, defaults=engine.defaults)
        image = load_first_frame(png(), WIDTH, HEIGHT, MediaPolicy())
        state = engine.new_session(SessionSpec(prompt="a quiet street", image=image, width=WIDTH, height=HEIGHT, seed=5))
        queue = ConditionQueue(script)
        local = np.concatenate([engine.step(state, queue.sample(3, i)).frames for i in range(3)])
        engine.close(state)
    finally:
        torch.set_num_threads(threads)
    assert served.shape == local.shape == (33, HEIGHT, WIDTH, 3)
    difference = np.abs(served.astype(int) - local.astype(int))
    assert difference.max() <= 2 and difference.mean() < 0.05, (difference.max(), difference.mean())
