"""Serving benchmark on the embedded default: the Ray graph against the in-process engine.

Measured in one run, on one machine:
- in-process: ``RealtimeEngine.step`` per chunk (steady state, after warm-up);
- Ray graph: the interval between consecutive ``chunk_stats`` at a WebSocket client (steady state:
  with pipelining this is the chunk period a viewer sees), its ratio to the in-process figure, and
  the time to first frame (init sent → first frame_batch);
- N concurrent sessions: aggregate generated fps and p95 ``chunk_total_ms``.

    python -m benchmarks.bench_serve --chunks 12 --sessions 4
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import socket
import statistics
import tempfile
import time

import msgspec
import numpy as np
import torch
import websockets
import yaml
from PIL import Image

WARMUP = 2


def first_frame(size=(160, 96)) -> bytes:
    rng = np.random.default_rng(0)
    base = np.linspace(0, 255, size[0] * size[1] * 3).reshape(size[1], size[0], 3)
    image = Image.fromarray((base + rng.integers(0, 40, base.shape)).clip(0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


async def client_session(url: str, chunks: int, fmt: str) -> dict:
    async with websockets.connect(url, max_size=None) as ws:
        init = {"type": "init", "prompt": "a street", "first_frame": first_frame(), "max_chunks": chunks, "realtime_output_format": fmt}
        sent = time.perf_counter()
        await ws.send(msgspec.msgpack.encode(init))
        first_batch, arrivals, totals, frames = None, [], [], 0
        try:
            while True:
                message = msgspec.msgpack.decode(await ws.recv())
                if message["type"] == "frame_batch" and first_batch is None:
                    first_batch = time.perf_counter()
                elif message["type"] == "chunk_stats":
                    arrivals.append(time.perf_counter())
                    totals.append(message["chunk_total_ms"])
                    frames += message["num_frames"]
                elif message["type"] == "error":
                    raise RuntimeError(message["content"])
        except websockets.ConnectionClosed:
            pass
    intervals = np.diff(arrivals)[WARMUP:]
    return {
        "ttff_s": first_batch - sent,
        "period_ms": float(np.median(intervals) * 1e3),
        "totals": totals[WARMUP:],
        "frames": frames,
        "elapsed_s": arrivals[-1] - arrivals[0],
        "frames_after_first": frames - 9,
    }


def in_process_ms(checkpoint: str, chunks: int, threads: int | None) -> float:
    from lingbot_ray.control.conditions import ConditionQueue
    from lingbot_ray.engine import RealtimeEngine, SessionSpec
    from lingbot_ray.serve.media import MediaPolicy, load_first_frame

    if threads:
        torch.set_num_threads(threads)
    engine = RealtimeEngine.from_pretrained(checkpoint)
    width, height = engine.defaults.width, engine.defaults.height
    image = load_first_frame(first_frame(), width, height, MediaPolicy())
    state = engine.new_session(SessionSpec(prompt="a street", image=image, width=width, height=height))
    queue = ConditionQueue()
    times = []
    for index in range(chunks):
        start = time.perf_counter()
        engine.step(state, queue.sample(3, index))
        times.append((time.perf_counter() - start) * 1e3)
    engine.close(state)
    return statistics.median(times[WARMUP:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="serve_config.yaml")
    parser.add_argument("--chunks", type=int, default=12)
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--format", default="raw")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray
    from ray import serve

    from lingbot_ray.serve.app import build_app
    from lingbot_ray.serve.config import load_config

    with open(args.config) as handle:
        app_args = yaml.safe_load(handle)["applications"][0]["args"]
    config = load_config(app_args)
    config.dit.sessions_per_group = max(config.dit.sessions_per_group, args.sessions)
    config.vae.sessions_per_replica = max(config.vae.sessions_per_replica, args.sessions)
    root = tempfile.mkdtemp(prefix="lrb")
    config.model.path = os.path.abspath(config.model.path)

    local = in_process_ms(build_checkpoint(config), args.chunks, config.model.torch_threads)
    print(f"in-process engine, steady chunk: {local:.0f} ms (torch threads {config.model.torch_threads})")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(include_dashboard=False, _temp_dir=os.path.join(root, "ray"), log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config), name="bench", route_prefix="/")
    url = f"ws://127.0.0.1:{port}/v1/realtime_video/generate"
    try:
        one = asyncio.run(client_session(url, args.chunks, args.format))
        print(f"Ray graph, 1 session: time to first frame {one['ttff_s']:.2f} s, steady chunk period {one['period_ms']:.0f} ms, "
              f"ratio to in-process {one['period_ms'] / local:.2f}")

        async def many():
            return await asyncio.gather(*[client_session(url, args.chunks, args.format) for _ in range(args.sessions)])

        results = asyncio.run(many())
        elapsed = max(r["elapsed_s"] for r in results)
        frames = sum(r["frames_after_first"] for r in results)
        totals = [t for r in results for t in r["totals"]]
        print(f"Ray graph, {args.sessions} concurrent sessions: aggregate {frames / elapsed:.1f} generated fps, "
              f"p95 chunk_total_ms {np.percentile(totals, 95):.0f}, median time to first frame "
              f"{statistics.median(r['ttff_s'] for r in results):.2f} s")
    finally:
        serve.shutdown()
        ray.shutdown()


def build_checkpoint(config) -> str:
    from lingbot_ray.serve.checkpoint import ensure_checkpoint

    return str(ensure_checkpoint(config.model))


if __name__ == "__main__":
    main()
