"""End to end through a real Ray cluster and real WebSockets (free port, private temp dir).

One small cluster serves the tiny checkpoint with two DiT groups of one session slot each, so
stickiness, spreading by capacity and refusal (1013) are all observable.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import time
import urllib.request

import msgspec
import numpy as np
import pytest
import torch
import websockets
from PIL import Image

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from lingbot_ray.control.conditions import ConditionQueue  # noqa: E402
from lingbot_ray.engine import PostOptions, RealtimeEngine, SessionSpec  # noqa: E402
from lingbot_ray.models.realesrgan import SRVGGNetCompact  # noqa: E402
from lingbot_ray.models.rife import IFNet  # noqa: E402
from lingbot_ray.models.tiny import build_tiny_checkpoint  # noqa: E402
from lingbot_ray.serve.app import build_app  # noqa: E402
from lingbot_ray.serve.media import MediaPolicy, load_first_frame  # noqa: E402
from lingbot_ray.transport import FrameDecoder  # noqa: E402
from tests.models.weights import save_realesrgan, save_rife  # noqa: E402
from tests.cluster import serve_cluster  # noqa: E402
from tests.msgpack_subset import walk  # noqa: E402

APP = "lingbot"
STAGE_TIMEOUT_S = 300  # the reference client asks for 832x480, slow for the CPU tiny model


def png(color=(40, 110, 190), size=(180, 110)) -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", size, color)
    for x in range(0, size[0], 12):  # some structure, so frames are not flat
        image.paste((255 - color[0], color[1], 90), (x, 0, x + 5, size[1]))
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def cluster():
    with serve_cluster("lr", num_cpus=8, metrics=True) as ray_cluster:
        root, port = ray_cluster.root, ray_cluster.port
        checkpoint = os.path.join(root, "ckpt")
        # the first frame's condition in one encoder step, as the embedded default serves it (a 832x480
        # session would otherwise run the encoder to its fixed point: over a minute on one thread)
        build_tiny_checkpoint(checkpoint, condition_frames=1)
        models = os.path.join(root, "models")
        os.makedirs(models)
        torch.manual_seed(0)
        save_rife(IFNet("4.22.lite"), os.path.join(models, "flownet.pkl"))
        save_realesrgan(SRVGGNetCompact(upscale=2, num_feat=8, num_conv=2), os.path.join(models, "esrgan.pth"), key="params_ema")
        args = {
            "model": {"path": checkpoint, "torch_threads": 1},
            "dit": {"num_groups": 2, "sessions_per_group": 1, "num_cpus_per_rank": 0.5},
            "vae": {"num_replicas": 1, "num_cpus": 0.5, "sessions_per_replica": 8},
            "text_encoder": {"num_cpus": 0.1},
            # WebRTC media on loopback only, as the test's peer (tests/serve/test_webrtc.py)
            "ingress": {"num_cpus": 0.1, "stage_timeout_s": STAGE_TIMEOUT_S, "webrtc_host_addresses": ["127.0.0.1"]},
            "postprocess": {
                "num_cpus": 0.1,
                "rife_model_path": os.path.join(models, "flownet.pkl"),
                "esrgan_model_path": os.path.join(models, "esrgan.pth"),
                "model_dirs": [models],
            },
        }
        serve.run(build_app(args), name=APP, route_prefix="/")
        yield {
            "url": f"ws://127.0.0.1:{port}/v1/realtime_video/generate",
            "http": f"http://127.0.0.1:{port}",
            "port": port,
            "metrics": f"http://127.0.0.1:{ray_cluster.metrics_port}/metrics",
            "checkpoint": checkpoint,
            "args": args,
            "models": models,
        }


def init_message(**fields):
    message = {"type": "init", "prompt": "a quiet street", "first_frame": png(), "max_chunks": 2, "seed": 3}
    message.update(fields)
    return msgspec.msgpack.encode(message)


async def collect(ws, decoder=None, stop_after_chunks=None):
    """Read until close; returns (batches, stats, errors, close code, close reason, frames)."""
    batches, stats, errors, frames = [], [], [], []
    decoder = decoder or FrameDecoder()
    try:
        while True:
            raw = await asyncio.wait_for(ws.recv(), STAGE_TIMEOUT_S)
            message = walk(raw)  # everything the server sends stays in the reference subset
            if message["type"] == "frame_batch":
                batches.append(message)
                frames.append(decoder.decode(message))
            elif message["type"] == "chunk_stats":
                stats.append(message)
                if stop_after_chunks is not None and len(stats) >= stop_after_chunks:
                    return batches, stats, errors, None, None, frames
            else:
                assert message["type"] == "error", message
                errors.append(message)
    except websockets.ConnectionClosed as closed:
        return batches, stats, errors, closed.rcvd.code, closed.rcvd.reason, frames


def run(coro):
    return asyncio.run(coro)


def describe_all(deployment: str, expected: int) -> dict[str, list]:
    """Every replica's sessions (calls without a session id spread over the replicas)."""
    handle = serve.get_deployment_handle(deployment, app_name=APP)
    seen: dict[str, list] = {}
    for _ in range(60):
        info = handle.describe.remote().result(timeout_s=30)
        seen[info["replica_id"]] = info["sessions"]
        if len(seen) >= expected:
            break
    return seen


# ------------------------------------------------------------------------------------- endpoints


def test_models_endpoints(cluster):
    with urllib.request.urlopen(cluster["http"] + "/v1/models", timeout=30) as response:
        body = json.loads(response.read())
        assert response.headers.get("access-control-allow-origin") is None  # no Origin sent
    card = body["data"][0]
    assert body["object"] == "list" and card["object"] == "model" and card["id"] == card["root"] == "lingbot-world-tiny-random"
    for key in ("created", "owned_by", "parent", "max_model_len", "num_gpus", "task_type", "dit_precision", "vae_precision", "pipeline_name", "pipeline_class"):
        assert key in card
    request = urllib.request.Request(cluster["http"] + "/v1/models/lingbot-world-tiny-random", headers={"Origin": "http://elsewhere"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert json.loads(response.read())["id"] == "lingbot-world-tiny-random"
        assert response.headers["access-control-allow-origin"] in ("*", "http://elsewhere")
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(cluster["http"] + "/v1/models/other", timeout=30)
    assert missing.value.code == 404
    assert json.loads(missing.value.read())["error"]["code"] == "model_not_found"


# -------------------------------------------------------------------------------------- protocol


@pytest.mark.parametrize("fmt", [None, "raw", "webp", "jpeg"])
def test_every_output_format_streams_and_completes(cluster, fmt):
    async def session():
        async with websockets.connect(cluster["url"], max_size=None) as ws:
            fields = {"unknown_future_key": [1, 2, 3]}
            if fmt:
                fields["realtime_output_format"] = fmt
            await ws.send(init_message(**fields))
            return await collect(ws)

    batches, stats, errors, code, reason, frames = run(session())
    assert (code, reason) == (1000, "generation complete") and not errors
    assert [s["chunk_index"] for s in stats] == [0, 1]
    assert [s["num_frames"] for s in stats] == [9, 12]
    assert [f.shape[1:] for f in frames] == [(96, 160, 3)] * len(frames)
    assert sum(f.shape[0] for f in frames) == 21
    expected_encoding = {None: "delta-gzip", "raw": "raw", "webp": "webp", "jpeg": "jpeg"}[fmt]
    assert {b["encoding"] for b in batches} == {expected_encoding}
    for s in stats:
        assert s["ws_write_ms"] == s["header_write_ms"] + s["raw_write_ms"]
        assert s["dit_ms"] > 0 and s["vae_ms"] > 0 and s["replica_id"].startswith("DiTGroup#")
        assert s["event_id"] is None


def test_invalid_init_and_events_keep_the_session(cluster):
    async def session():
        async with websockets.connect(cluster["url"], max_size=None) as ws:
            await ws.send(msgspec.msgpack.encode({"type": "init", "prompt": "x", "first_frame": png(), "size": "100x100"}))
            first = walk(await ws.recv())
            await ws.send(b"\xc1 not msgpack")
            second = walk(await ws.recv())
            await ws.send(init_message(max_chunks=3, realtime_output_format="raw"))
            await ws.send(msgspec.msgpack.encode({"type": "event", "kind": "zoom", "payload": 1}))
            await ws.send(msgspec.msgpack.encode({"type": "init", "prompt": "again"}))
            await ws.send(
                msgspec.msgpack.encode(
                    {"type": "event", "kind": "camera_actions", "event_id": 7, "payload": {"mode": "state", "transitions": [{"actions": ["w"], "client_ts_ms": 1}]}}
                )
            )
            return first, second, await collect(ws)

    first, second, (batches, stats, errors, code, reason, _) = run(session())
    assert first["content"] == "invalid generate request" and "size" in first["detail"]
    assert second["content"] == "invalid generate request"
    assert [e["content"] for e in errors] == ["invalid event", "invalid event"]
    assert (code, reason) == (1000, "generation complete") and len(stats) == 3
    # the camera event is echoed from the chunk that sampled it on, in every batch and stat
    echoed = [s["event_id"] for s in stats]
    assert echoed[-1] == 7 and all(e in (None, 7) for e in echoed)
    first_echo = echoed.index(7)
    assert all(b.get("event_id") == 7 for b in batches if b["chunk_index"] >= first_echo)
    assert all("event_id" not in b for b in batches if b["chunk_index"] < first_echo)


# ----------------------------------------------------------------------- stickiness and capacity


def test_sessions_are_sticky_spread_by_capacity_and_refused_when_full(cluster):
    async def long_session(results, key, started):
        async with websockets.connect(cluster["url"], max_size=None) as ws:
            await ws.send(init_message(max_chunks=6, realtime_output_format="raw"))
            first = await collect(ws, stop_after_chunks=1)
            started.set()
            rest = await collect(ws)
            results[key] = (first[1] + rest[1], rest[3], rest[4])

    async def refused_session():
        async with websockets.connect(cluster["url"], max_size=None) as ws:
            await ws.send(init_message(realtime_output_format="raw"))
            return await collect(ws)

    async def scenario():
        results: dict = {}
        started_a, started_b = asyncio.Event(), asyncio.Event()
        tasks = [
            asyncio.create_task(long_session(results, "a", started_a)),
            asyncio.create_task(long_session(results, "b", started_b)),
        ]
        await asyncio.wait_for(asyncio.gather(started_a.wait(), started_b.wait()), 120)
        vae = serve.get_deployment_handle("VAEDecoder", app_name=APP)
        encoded_before = (await vae.describe.remote())["starts"]
        refused = await refused_session()
        encoded_after = (await vae.describe.remote())["starts"]
        await asyncio.gather(*tasks)
        return results, refused, encoded_after - encoded_before

    results, refused, encoded = run(scenario())
    _, _, errors, code, _, _ = refused
    assert code == 1013 and errors and "no capacity" in errors[0]["content"]
    assert encoded == 0, "the refused session's first frame was encoded: refusal must come before model work"
    replicas = []
    for key in ("a", "b"):
        stats, close_code, reason = results[key]
        assert (close_code, reason) == (1000, "generation complete") and len(stats) == 6
        ids = {s["replica_id"] for s in stats}
        assert len(ids) == 1, f"session {key} moved between DiT groups: {ids}"
        replicas.append(ids.pop())
    assert replicas[0] != replicas[1], "two sessions share a 1-slot group: not spread by capacity"


# ------------------------------------------------------------------------------------------ faults


def test_disconnect_mid_chunk_frees_every_stage(cluster):
    async def session():
        async with websockets.connect(cluster["url"], max_size=None) as ws:
            await ws.send(init_message(max_chunks=None, realtime_output_format="raw"))
            await collect(ws, stop_after_chunks=1)
            # leave while the next chunk is being generated

    run(session())
    deadline = time.monotonic() + 30
    while True:
        dit, vae = describe_all("DiTGroup", 2), describe_all("VAEDecoder", 1)
        if all(not s for s in dit.values()) and all(not s for s in vae.values()):
            break
        assert time.monotonic() < deadline, f"sessions left after disconnect: dit={dit} vae={vae}"
        time.sleep(0.5)


def test_killed_dit_replica_ends_its_session_and_service_recovers(cluster):
    async def doomed():
        async with websockets.connect(cluster["url"], max_size=None) as ws:
            await ws.send(init_message(max_chunks=None, realtime_output_format="raw"))
            _, stats, _, _, _, _ = await collect(ws, stop_after_chunks=1)
            unique_id = stats[0]["replica_id"].split("#", 1)[1]
            actor = ray.get_actor(f"SERVE_REPLICA::{APP}#DiTGroup#{unique_id}", namespace="serve")
            killed_at = time.monotonic()
            ray.kill(actor, no_restart=False)
            _, _, errors, code, _, _ = await collect(ws)
            return errors, code, time.monotonic() - killed_at

    errors, code, seconds = run(doomed())
    assert code == 1011 and errors and errors[-1]["content"].startswith("error during generate loop:")
    assert seconds < 30
    deadline = time.monotonic() + 30
    while any(describe_all("VAEDecoder", 1).values()):  # the VAE side of the failed session is freed
        assert time.monotonic() < deadline
        time.sleep(0.5)

    async def fresh():
        async with websockets.connect(cluster["url"], max_size=None) as ws:
            await ws.send(init_message(realtime_output_format="raw"))
            return await collect(ws)

    deadline = time.monotonic() + 90
    while True:
        _, stats, errors, code, reason, _ = run(fresh())
        if code == 1000:
            break
        assert code == 1013 and time.monotonic() < deadline, (code, reason, errors)
        time.sleep(2)  # the killed group is restarting and the other may still be freeing
    assert len(stats) == 2


# ----------------------------------------------------------------------- Ray graph == in-process


def test_ray_graph_and_in_process_engine_give_identical_raw_frames(cluster):
    script = [["w"], ["w"], ["j"], ["w", "l"], [], ["d"]]

    async def session():
        async with websockets.connect(cluster["url"], max_size=None) as ws:
            await ws.send(
                init_message(seed=11, max_chunks=2, realtime_output_format="raw", condition_inputs={"camera_actions": script})
            )
            return await collect(ws)

    _, stats, errors, code, _, frames = run(session())
    assert code == 1000 and not errors
    served = np.concatenate(frames)

    # bit-exact needs the replicas' intra-op thread count (model.torch_threads) here too
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = RealtimeEngine.from_pretrained(cluster["checkpoint"])
    image = load_first_frame(png(), 160, 96, MediaPolicy())
    state = engine.new_session(SessionSpec(prompt="a quiet street", image=image, width=160, height=96, seed=11))
    queue = ConditionQueue(script)
    local = np.concatenate([engine.step(state, queue.sample(3, i)).frames for i in range(2)])
    engine.close(state)
    torch.set_num_threads(threads)
    assert served.shape == local.shape
    assert np.array_equal(served, local)


def _engine_frames(checkpoint, script, seed, chunks, post=None):
    """The same session through the in-process engine: the one stage chain, called in this thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = RealtimeEngine.from_pretrained(checkpoint)
        image = load_first_frame(png(), 160, 96, MediaPolicy())
        state = engine.new_session(SessionSpec(prompt="a quiet street", image=image, width=160, height=96, seed=seed), post)
        queue = ConditionQueue(script)
        frames = np.concatenate([engine.step(state, queue.sample(3, i)).frames for i in range(chunks)])
        engine.close(state)
        return frames
    finally:
        torch.set_num_threads(threads)


def test_sequence_parallel_group_of_two_ranks_matches_one(cluster):
    args = dict(cluster["args"], dit={"num_groups": 1, "sessions_per_group": 1, "sequence_parallel_degree": 2, "num_cpus_per_rank": 0.5})
    serve.run(build_app(args), name="sp", route_prefix="/sp")
    script = [["w"], ["l"], ["w"], ["i"], ["w", "j"], []]
    try:
        async def session():
            url = f"ws://127.0.0.1:{cluster['port']}/sp/v1/realtime_video/generate"
            async with websockets.connect(url, max_size=None) as ws:
                await ws.send(init_message(seed=5, max_chunks=2, realtime_output_format="raw", condition_inputs={"camera_actions": script}))
                return await collect(ws)

        _, stats, errors, code, _, frames = run(session())
        assert code == 1000 and not errors, errors
        served = np.concatenate(frames)
        local = _engine_frames(cluster["checkpoint"], script, 5, 2)
        assert served.shape == local.shape
        difference = np.abs(served.astype(np.int16) - local.astype(np.int16))
        # fp32 reductions in another order: a few values off by one level, nothing more
        assert difference.max() <= 1 and (difference > 0).mean() < 1e-3, (difference.max(), (difference > 0).mean())
        assert not np.array_equal(local, _engine_frames(cluster["checkpoint"], [], 5, 2))  # the script matters
        handle = serve.get_deployment_handle("DiTGroup", app_name="sp")
        group = handle.describe.remote().result(timeout_s=30)
        assert group["ranks"] == 2

        # check_health covers every rank: a dead worker rank makes Serve replace the whole group
        assert len(group["rank_pids"]) == 2
        os.kill(group["rank_pids"][1], signal.SIGKILL)
        deadline = time.monotonic() + 90
        while True:
            try:
                now = handle.describe.remote().result(timeout_s=30)
                if now["replica_id"] != group["replica_id"]:
                    break
            except Exception:  # the group is being replaced
                pass
            assert time.monotonic() < deadline, "the group with a dead rank was not replaced"
            time.sleep(2)
    finally:
        serve.delete("sp")


def test_a_minimal_synchronous_client_receives_frames(cluster):
    """A client as small as the reference page's sketch, written here: the synchronous websocket-client
    library, one MessagePack init carrying a JPEG file's bytes at 832x480 with webp output, a camera
    event, then reads until the first chunk's stats. Clients of that shape work unchanged."""
    websocket = pytest.importorskip("websocket")  # websocket-client
    jpeg = io.BytesIO()
    Image.open(io.BytesIO(png(size=(832, 480)))).convert("RGB").save(jpeg, "JPEG", quality=90)
    ws = websocket.create_connection(f"ws://127.0.0.1:{cluster['port']}/v1/realtime_video/generate", timeout=STAGE_TIMEOUT_S)
    try:
        init = {"type": "init", "prompt": "a quiet street", "size": "832x480", "first_frame": jpeg.getvalue(),
                "realtime_output_format": "webp", "max_chunks": 1}
        ws.send_binary(msgspec.msgpack.encode(init))
        ws.send_binary(msgspec.msgpack.encode({"type": "event", "kind": "camera_actions", "payload": [["w"]] * 3, "event_id": 1}))
        batches, stats = [], []
        while not stats:
            message = walk(ws.recv())
            assert message["type"] != "error", message
            (batches if message["type"] == "frame_batch" else stats).append(message)
    finally:
        ws.close()
    frames = FrameDecoder().decode(batches[0])
    assert batches[0]["encoding"] == "webp" and frames.shape[1:] == (480, 832, 3)
    assert stats[0]["num_frames"] == 9 and stats[0]["event_id"] in (None, 1)


def test_prometheus_metrics_are_exported(cluster):
    import re

    # runs after sessions above (one of them echoes event 7, one is refused); Ray's metrics agent exports
    # on its own period. Ray prefixes application metrics with "ray_", adds "_total" to counters and the
    # deployment/replica/application tags (the names: lingbot_ray/serve/metrics.py, docs/grafana/)
    wanted = (
        "ray_lingbot_sessions_started_total",
        "ray_lingbot_sessions_ended_total",
        "ray_lingbot_sessions_rejected_total",
        "ray_lingbot_sessions_active",
        "ray_lingbot_chunks_sent_total",
        "ray_lingbot_frames_generated_total",
        "ray_lingbot_bytes_sent_total",
        "ray_lingbot_chunk_latency_ms_bucket",
        "ray_lingbot_chunk_latency_ms_exact_sum_total",
        "ray_lingbot_chunk_stage_ms_bucket",
        "ray_lingbot_chunk_stage_ms_exact_sum_total",
        "ray_lingbot_time_to_first_frame_ms_bucket",
        "ray_lingbot_time_to_first_frame_ms_exact_sum_total",
        "ray_lingbot_event_latency_ms_bucket",
        "ray_lingbot_event_latency_ms_exact_sum_total",
        "ray_lingbot_session_slots_used",
        "ray_lingbot_session_slots_free",
        "ray_lingbot_kv_cache_bytes",
        "ray_lingbot_text_cache_bytes",
    )

    def scrape() -> str:
        try:
            with urllib.request.urlopen(cluster["metrics"], timeout=10) as response:
                return response.read().decode()
        except OSError:
            return ""

    def series(text: str, name: str, **tags) -> list[tuple[dict[str, str], float]]:
        """(labels, value) of every sample of ``name`` whose labels include ``tags``."""
        found = []
        for line in text.splitlines():
            if line.startswith(name + "{"):
                labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', line[len(name) : line.rindex("}") + 1]))
                if all(labels.get(k) == v for k, v in tags.items()):
                    found.append((labels, float(line.rsplit(" ", 1)[1])))
        return found

    def slots_by_replica(text: str, deployment: str) -> dict[str, tuple[float, float]]:
        used = {labels["replica"]: value for labels, value in series(text, "ray_lingbot_session_slots_used", application=APP, deployment=deployment)}
        free = {labels["replica"]: value for labels, value in series(text, "ray_lingbot_session_slots_free", application=APP, deployment=deployment)}
        return {replica: (used[replica], free[replica]) for replica in used.keys() & free.keys()}

    def complete(text: str) -> bool:
        return all(name in text for name in wanted) and all(
            slots_by_replica(text, deployment) for deployment in ("Ingress", "DiTGroup", "VAEDecoder")
        ) and bool(series(text, "ray_lingbot_kv_cache_bytes", application=APP, deployment="DiTGroup"))

    deadline = time.monotonic() + 60
    while not complete(text := scrape()):
        assert time.monotonic() < deadline, [name for name in wanted if name not in text]
        time.sleep(2)
    assert any(value >= 1 for _, value in series(text, "ray_lingbot_sessions_started_total"))
    # stages only where they ran, the chunk's own latency apart
    stages = {labels["stage"] for labels, _ in series(text, "ray_lingbot_chunk_stage_ms_count")}
    assert {"dit", "vae"} <= stages and "chunk_total" not in stages, stages
    # the exact means: summed milliseconds beside each histogram's (exact) count
    chunks = sum(value for _, value in series(text, "ray_lingbot_chunk_latency_ms_count"))
    summed = sum(value for _, value in series(text, "ray_lingbot_chunk_latency_ms_exact_sum_total"))
    assert chunks >= 1 and summed / chunks > 0
    assert sum(value for _, value in series(text, "ray_lingbot_time_to_first_frame_ms_count")) >= 1
    # per replica: used + free is the replica's capacity (dit.sessions_per_group, vae.sessions_per_replica)
    for deployment, capacity in (("DiTGroup", 1), ("VAEDecoder", 8)):
        slots = slots_by_replica(text, deployment)
        assert slots and all(used + free == capacity for used, free in slots.values()), (deployment, slots)
    assert all(value >= 0 for _, value in series(text, "ray_lingbot_kv_cache_bytes", application=APP, deployment="DiTGroup"))
    assert not series(text, "ray_lingbot_kv_cache_bytes", deployment="VAEDecoder")
    # the counts hold still now: Ray exports a gauge within a report interval (10 s) and its agent drops
    # it two intervals later unless it is set again, so a gauge set only on change is gone by now
    time.sleep(40)
    text = scrape()
    active = [value for _, value in series(text, "ray_lingbot_sessions_active")]
    assert active and all(value == 0 for value in active), active
    for deployment in ("Ingress", "DiTGroup", "VAEDecoder"):
        slots = slots_by_replica(text, deployment)
        assert slots and all(used == 0 for used, _ in slots.values()), (deployment, slots)
    kv = [value for _, value in series(text, "ray_lingbot_kv_cache_bytes", application=APP, deployment="DiTGroup")]
    assert kv and all(value == 0 for value in kv), kv  # every session closed: no cache held


def test_interpolation_then_upscaling_through_the_graph(cluster):
    async def session(**fields):
        async with websockets.connect(cluster["url"], max_size=None) as ws:
            await ws.send(init_message(realtime_output_format="raw", **fields))
            return await collect(ws)

    batches, stats, errors, code, reason, frames = run(
        session(enable_frame_interpolation=True, frame_interpolation_exp=1, enable_upscaling=True, upscaling_scale=4)
    )
    assert (code, reason) == (1000, "generation complete") and not errors, errors
    # RIFE first (2x frames, the first chunk's first frame has no predecessor), then x4 (a x2 model resized)
    assert [s["num_frames"] for s in stats] == [17, 24]
    assert {f.shape[1:] for f in frames} == {(384, 640, 3)}
    assert all(b["fps"] == 32.0 for b in batches) and all(s["fps"] == 32.0 for s in stats)
    assert stats[1]["num_batches"] >= 3  # 17.7 MB of raw frames split under the 8 MiB message limit
    assert all(s["postprocess_ms"] > 0 for s in stats)
    # post-processing is a stage of the one chain: the in-process engine gives the same frames
    post = PostOptions(exp=1, upscale=4.0, rife_path=cluster["args"]["postprocess"]["rife_model_path"],
                       esrgan_path=cluster["args"]["postprocess"]["esrgan_model_path"])
    assert np.array_equal(np.concatenate(frames), _engine_frames(cluster["checkpoint"], [], 3, 2, post))

    outside = os.path.join(os.path.dirname(cluster["models"]), "ckpt", "model_index.json")

    async def refused():
        async with websockets.connect(cluster["url"], max_size=None) as ws:
            await ws.send(init_message(enable_frame_interpolation=True, frame_interpolation_model_path=outside))
            return walk(await ws.recv())

    error = run(refused())
    assert error["content"] == "invalid generate request" and "frame_interpolation_model_path" in error["detail"]


def test_ingress_replica_never_loads_the_model_stack(cluster):
    """Runs after sessions of every kind have streamed through it: the ingress read the checkpoint's
    facts from JSON and carried typed messages, and its process still holds no model library."""
    info = serve.get_deployment_handle("Ingress", app_name=APP).describe.remote().result(timeout_s=30)
    assert info["model_modules"] == []


def test_an_offline_clip_through_the_graph(cluster):
    """POST /v1/videos through Serve: an MP4 of the whole clip, the same frames as the graph's live
    session with the same init (lossless), and the stages freed afterwards."""
    import av

    request = {"prompt": "a quiet street", "first_frame": png(), "max_chunks": 2, "seed": 3, "lossless": True}
    http_request = urllib.request.Request(
        cluster["http"] + "/v1/videos", data=msgspec.msgpack.encode(request),
        headers={"Content-Type": "application/msgpack"}, method="POST",
    )
    with urllib.request.urlopen(http_request, timeout=STAGE_TIMEOUT_S) as response:
        summary = json.loads(response.headers["X-Lingbot-Clip"])
        with av.open(io.BytesIO(response.read())) as container:
            clip = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])

    async def live():
        async with websockets.connect(cluster["url"], max_size=None) as ws:
            await ws.send(init_message(realtime_output_format="raw"))
            return await collect(ws)

    frames = run(live())[5]
    assert summary["chunks"] == 2 and len(clip) == summary["frames"]
    assert np.array_equal(np.concatenate(frames), clip)
    assert not any(describe_all("DiTGroup", 2).values())


def test_a_webrtc_session_through_the_graph(cluster):
    """POST /v1/realtime_video/webrtc through Serve's proxy to the ingress replica, whose peer
    connection sends the video track and the data channel's chunk_stats straight to the client."""
    pytest.importorskip("aiortc")
    from types import SimpleNamespace

    from tests.serve.test_webrtc import Peer

    server = SimpleNamespace(address=f"127.0.0.1:{cluster['port']}")

    async def scenario():
        peer = Peer()
        try:
            await peer.start(server, {"prompt": "a quiet street", "first_frame": png(), "seed": 3, "max_chunks": 2})
            await peer.until(lambda: len(peer.stats()) >= 2 and peer.frames, timeout=STAGE_TIMEOUT_S)
            await peer.until(peer.closed.is_set, timeout=60)  # the server closes after max_chunks
        finally:
            await peer.pc.close()
        return peer

    peer = run(scenario())
    assert [s["chunk_index"] for s in peer.stats()] == [0, 1]
    assert peer.frames[0].shape[2] == 3 and any(frame.std() > 0 for frame in peer.frames)
    deadline = time.monotonic() + 30  # the server releases the stages once its peer connection closed
    while any(describe_all("DiTGroup", 2).values()):
        assert time.monotonic() < deadline, "the WebRTC session's DiT slot was not freed"
        time.sleep(0.2)
