"""Long sessions and careless or hostile clients against the app of ``serve_config.yaml`` on a real
Ray cluster.

- A session of 1,000 chunks keeps the memory of every replica flat: nothing on a session's path may
  grow with its length.
- Abrupt disconnects at every phase of a session leak no slot anywhere (ingress, DiT group, VAE
  replica, the sessions metric), and after a storm of them a session at full capacity streams.
- Fuzzed init and event messages are answered with errors naming a field; the server goes on.
- A live knob changes through a redeploy without replacing a replica or cutting a session.

The app serves a copy of the embedded model whose transformer config allows 4,096 RoPE positions
instead of 1,024 (the limit only ends a session: the frames of the first 1,024 latent frames are the
same), so that one session can run 1,000 chunks of 3 latent frames.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import time
import urllib.request

import msgspec
import pytest
import websockets
import yaml

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from lingbot_ray.checkpoint import checkpoint_folder  # noqa: E402
from tests.cluster import serve_cluster  # noqa: E402
from tests.serve.test_e2e import collect, init_message  # noqa: E402

APP = "lingbot"
CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "serve_config.yaml")
# Every slot is free again within this long after the last client left: a session abandoned while
# it opened finishes the stage call it is in (a first-frame encode) before its close lands.
SLOTS_FREE_WITHIN_S = 30.0


@pytest.fixture(scope="module")
def server():
    with serve_cluster("la", num_cpus=4, metrics=True) as cluster:
        with open(CONFIG) as handle:
            args = yaml.safe_load(handle)["applications"][0]["args"]
        checkpoint = os.path.join(cluster.root, "lingbot-world-tiny")
        shutil.copytree(checkpoint_folder(args["model"]["path"]), checkpoint)
        config_file = os.path.join(checkpoint, "transformer", "config.json")
        with open(config_file) as handle:
            transformer = json.load(handle)
        with open(config_file, "w") as handle:
            json.dump({**transformer, "rope_max_seq_len": 4096}, handle)
        args["model"]["path"] = checkpoint
        frames = os.path.join(cluster.root, "frames")  # a folder first_frame paths may name, with a FIFO in it
        os.makedirs(frames)
        os.mkfifo(os.path.join(frames, "fifo.png"))
        args["media"]["allowed_dirs"] = [frames]
        deploy(args)
        yield {
            "url": f"ws://127.0.0.1:{cluster.port}/v1/realtime_video/generate",
            "metrics": f"http://127.0.0.1:{cluster.metrics_port}/metrics",
            "logs": os.path.join(cluster.root, "ray", "session_latest", "logs", "serve"),
            "frames": frames,
            "args": args,
        }


def deploy(args: dict, deployments: list | None = None) -> None:
    """Deploy as ``serve run serve_config.yaml`` (and KubeRay) do: from a config, so that a redeploy
    that changes only a deployment's options (``user_config``) replaces no replica."""
    from ray.serve.schema import ServeDeploySchema

    app = {"name": APP, "route_prefix": "/", "import_path": "lingbot_ray.serve.app:build_app", "args": args}
    if deployments:
        app["deployments"] = deployments
    serve.context._get_global_client().deploy_apps(ServeDeploySchema.model_validate({"applications": [app]}), _blocking=True)


def describe(deployment: str) -> dict:
    return serve.get_deployment_handle(deployment, app_name=APP).describe.remote().result(timeout_s=30)


def held() -> dict[str, int]:
    ingress = describe("Ingress")
    return {
        "ingress sessions": ingress["sessions"],
        "ingress waiting for init": ingress["waiting_for_init"],
        "DiT group": len(describe("DiTGroup")["sessions"]),
        "VAE decoder": len(describe("VAEDecoder")["sessions"]),
    }


def sessions_active_metric(url: str) -> list[float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("ray_lingbot_sessions_active{")]


async def abrupt(url: str, phase: str) -> None:
    """Connect, get to ``phase``, then drop the TCP connection without a close handshake."""
    ws = await websockets.connect(url, max_size=None)
    try:
        if phase != "before init":
            await ws.send(init_message(max_chunks=None))
        if phase == "mid-chunk":
            while msgspec.msgpack.decode(await asyncio.wait_for(ws.recv(), 120))["type"] != "frame_batch":
                pass
    finally:
        ws.transport.abort()


def test_a_storm_of_abrupt_disconnects_leaks_no_slot(server):
    phases = ["before init"] * 40 + ["after init"] * 40 + ["mid-chunk"] * 24
    random.Random(7).shuffle(phases)

    async def storm():
        # 2 at a time, as many as the DiT group has slots: a mid-chunk client must get one, and an
        # abandoned opening holds its slot until its close lands (refusals meanwhile are retried)
        gate = asyncio.Semaphore(2)

        async def one(phase):
            async with gate:
                for _ in range(240):
                    try:
                        return await abrupt(server["url"], phase)
                    except websockets.ConnectionClosed as closed:  # refused while the slots turn over
                        assert closed.rcvd is not None and closed.rcvd.code == 1013, closed
                        reason = closed.rcvd.reason
                        await asyncio.sleep(0.5)
                raise AssertionError(f"{phase}: refused for 120 s ({reason})")

        await asyncio.gather(*(one(phase) for phase in phases))

    asyncio.run(storm())
    left = time.monotonic()
    while (counts := held()) != dict.fromkeys(counts, 0):
        assert time.monotonic() - left < SLOTS_FREE_WITHIN_S, f"still held after the storm: {counts}"
        time.sleep(0.5)

    async def full_capacity():  # both DiT slots at once, each streaming to the end
        async def session():
            async with websockets.connect(server["url"], max_size=None) as ws:
                await ws.send(init_message(max_chunks=2, realtime_output_format="raw"))
                return await collect(ws)

        return await asyncio.gather(session(), session())

    for _, stats, errors, code, reason, _ in asyncio.run(full_capacity()):
        assert (code, reason) == (1000, "generation complete") and len(stats) == 2 and not errors
    deadline = time.monotonic() + 60  # Ray's metrics agent exports on its own period
    while (active := sessions_active_metric(server["metrics"])) != [0.0]:
        assert time.monotonic() < deadline, f"ray_lingbot_sessions_active: {active}"
        time.sleep(2)
    # abandoned calls end quietly: no "Task exception was never retrieved", no cancellation tracebacks
    noise = [line for line in ingress_log_lines(server) if "never retrieved" in line or "RequestCancelledError" in line]
    assert not noise, noise[:3]


def ingress_log_lines(server) -> list[str]:
    lines = []
    for name in os.listdir(server["logs"]):
        if name.startswith("replica_") and "Ingress" in name:
            with open(os.path.join(server["logs"], name), errors="replace") as handle:
                lines += handle.readlines()
    return lines


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("VmRSS:")) / 1024


# Growth allowed between chunk 100 (after warm-up) and chunk 1,000, per replica. Keeping every chunk
# (as the ingress once did) would add 36 KB of frames per chunk here: 32 MB over the 900 chunks.
RSS_GROWTH_BOUND_MB = 12.0


def test_a_1000_chunk_session_keeps_every_replica_memory_flat(server):
    pids = {name: describe(name)["pid"] for name in ("Ingress", "DiTGroup", "VAEDecoder")}
    chunks, warm = 1000, 100

    async def session():
        samples = {}
        async with websockets.connect(server["url"], max_size=None) as ws:
            # the smallest frames and one sampler step: 1,000 chunks in about two minutes
            await ws.send(init_message(max_chunks=chunks, size="32x32", num_inference_steps=1, realtime_output_format="raw"))
            last = -1
            while True:
                try:
                    message = msgspec.msgpack.decode(await asyncio.wait_for(ws.recv(), 120))
                except websockets.ConnectionClosed as closed:
                    return samples, last, closed.rcvd.code
                assert message["type"] != "error", message
                if message["type"] == "chunk_stats":
                    last = message["chunk_index"]
                    if last in (warm, chunks - 1):
                        samples[last] = {name: rss_mb(pid) for name, pid in pids.items()}

    samples, last, code = asyncio.run(session())
    assert (last, code) == (chunks - 1, 1000)
    growth = {name: samples[chunks - 1][name] - samples[warm][name] for name in pids}
    print(f"RSS MB at chunk {warm} -> {chunks - 1}:", {n: (round(samples[warm][n]), round(samples[chunks - 1][n])) for n in pids})
    assert all(g < RSS_GROWTH_BOUND_MB for g in growth.values()), growth


# ------------------------------------------------------------------------------------------ fuzz

INIT_FIELDS = [
    "prompt", "model", "first_frame", "size", "fps", "num_frames", "seed", "num_inference_steps", "guidance_scale",
    "negative_prompt", "max_chunks", "realtime_causal_sink_size", "realtime_causal_kv_cache_num_frames",
    "realtime_output_format", "output_compression", "realtime_preview_max_width", "realtime_output_pacing", "quality",
    "enable_upscaling", "upscaling_scale", "upscaling_model_path", "enable_frame_interpolation",
    "frame_interpolation_exp", "frame_interpolation_scale", "frame_interpolation_model_path", "condition_inputs", "type",
]


def fuzz_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(16)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1, 7, 2**31, 2**32, 2**63 - 1, -(2**63)])
    if kind == 3:
        return rng.choice([0.0, -0.5, 1e-300, 1e300, float("nan"), float("inf"), 16.0, 12.5])
    if kind == 4:
        return "".join(rng.choice("wasdijkl xX0123456789.:/\\\x00é漢") for _ in range(rng.randrange(0, 40)))
    if kind == 5:
        return "z" * rng.choice([1000, 100_000])
    if kind == 6:
        return rng.choice(["160x96", "32x32", "0x0", "99999x99999", "17x17", "x", "raw", "webp", "lossless", "high"])
    if kind == 7:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
    if kind == 8:
        return msgspec.msgpack.Ext(rng.randrange(128), b"\x01\x02")
    if kind == 9 and depth < 3:
        return [fuzz_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    if kind == 10 and depth < 3:
        return {rng.choice(["a", "mode", "transitions", "camera_actions", "actions"]): fuzz_value(rng, depth + 1) for _ in range(3)}
    if kind == 11:
        return [["w", "a"], ["zz"], []][: rng.randrange(4)]
    if kind == 12:
        return {"mode": "state", "transitions": [{"actions": rng.choice([["w"], "w", [1], None]), "client_ts_ms": fuzz_value(rng, 3)}]}
    if kind == 13:
        return {"camera_actions": [[fuzz_value(rng, 3)]]}
    if kind == 14:
        return [[1, 2, [3, [4, [5]]]]] * rng.randrange(1, 20)
    return rng.choice(["a prompt", "prompt", "camera_actions", "composite_input", "event", "init"])


def fuzz_init(rng: random.Random) -> bytes:
    message = {"type": "init", "prompt": "fuzz", "first_frame": PNG, "max_chunks": 1, "size": "32x32", "num_inference_steps": 1}
    for _ in range(rng.randrange(1, 4)):
        message[rng.choice(INIT_FIELDS + ["unknown_key"])] = fuzz_value(rng)
    if rng.random() < 0.05:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))  # not MessagePack at all
    if rng.random() < 0.03:
        message[rng.randrange(9)] = "a non-string key"
    return msgspec.msgpack.encode(message)


def fuzz_event(rng: random.Random) -> bytes:
    message = {"type": "event", "kind": rng.choice(["prompt", "camera_actions", "composite_input", "bogus", 3, None])}
    message["payload"] = fuzz_value(rng)
    if rng.random() < 0.5:
        message["event_id"] = fuzz_value(rng)
    if rng.random() < 0.2:
        message["payload"] = {"input_types": fuzz_value(rng), "prompt": fuzz_value(rng), "camera_actions": fuzz_value(rng)}
    if rng.random() < 0.05:
        message["type"] = fuzz_value(rng)
    return msgspec.msgpack.encode(message)


PNG = None
DOCUMENTED_CLOSES = {1000, 1008, 1009, 1013}


def check_error(message: dict, content: str) -> None:
    assert message["content"] == content, message
    field = message["detail"].split("=", 1)[0]
    assert field and " " not in field and len(message["detail"]) < 600, message


def test_fuzzed_inits_and_events_get_errors_naming_fields_and_the_server_keeps_serving(server):
    global PNG
    from tests.serve.test_e2e import png

    PNG = png(size=(40, 24))
    counts = {"init": 0, "event": 0, "errors": 0, "sessions": 0}

    async def init_worker(seed: int, n: int):
        rng = random.Random(seed)
        ws = await websockets.connect(server["url"], max_size=None)
        for _ in range(n):
            await ws.send(fuzz_init(rng))
            counts["init"] += 1
            reply = msgspec.msgpack.decode(await asyncio.wait_for(ws.recv(), 120))
            if reply["type"] == "error":
                if reply["content"] == "invalid generate request":
                    counts["errors"] += 1
                    check_error(reply, "invalid generate request")
                    continue
                assert reply["content"].startswith("no capacity"), reply  # a valid one met full groups
            else:  # a valid init: it streams its one chunk and closes
                assert reply["type"] == "frame_batch", reply
                counts["sessions"] += 1
            try:
                while True:
                    msgspec.msgpack.decode(await asyncio.wait_for(ws.recv(), 120))
            except websockets.ConnectionClosed as closed:
                assert closed.rcvd.code in DOCUMENTED_CLOSES, closed
            ws = await websockets.connect(server["url"], max_size=None)
        await ws.close()

    async def event_worker(seed: int, n: int):
        rng = random.Random(seed)
        async with websockets.connect(server["url"], max_size=None) as ws:
            await ws.send(msgspec.msgpack.encode({"type": "init", "prompt": "fuzz", "first_frame": PNG, "size": "32x32", "num_inference_steps": 1}))
            for _ in range(n):
                await ws.send(fuzz_event(rng))
                counts["event"] += 1
            await ws.send(msgspec.msgpack.encode({"type": "event", "kind": "prompt", "payload": "the last one", "event_id": 999}))
            while True:  # every invalid event is answered, and the session streams on to the last event
                message = msgspec.msgpack.decode(await asyncio.wait_for(ws.recv(), 120))
                if message["type"] == "error":
                    counts["errors"] += 1
                    check_error(message, "invalid event")
                elif message["type"] == "chunk_stats" and message["event_id"] == 999:
                    return

    async def fuzz():
        await asyncio.gather(*(init_worker(seed, 180) for seed in range(4)), *(event_worker(100 + seed, 200) for seed in range(2)))

    asyncio.run(fuzz())
    assert counts["init"] >= 700 and counts["event"] >= 400 and counts["init"] + counts["event"] >= 1000, counts
    print("fuzz:", counts)
    longest = max(len(line) for line in ingress_log_lines(server))
    assert longest < 2200, f"a log line of {longest} characters"
    with urllib.request.urlopen(server["url"].replace("ws://", "http://").replace("/realtime_video/generate", "/models"), timeout=30) as response:
        assert response.status == 200

    async def normal():
        async with websockets.connect(server["url"], max_size=None) as ws:
            await ws.send(init_message(max_chunks=2))
            return await collect(ws)

    _, stats, errors, code, reason, _ = asyncio.run(normal())
    assert (code, reason) == (1000, "generation complete") and len(stats) == 2 and not errors


# ------------------------------------------------------------------------------------ live config


def test_a_live_knob_changes_without_replacing_a_replica_or_cutting_a_session(server):
    """Changing an ingress knob in the serve config's ``deployments`` section (Serve's user_config)
    redeploys without replacing a replica: a session that was streaming keeps streaming."""
    before = {name: describe(name)["replica_id"] for name in ("Ingress", "DiTGroup", "VAEDecoder", "TextEncoder")}
    assert describe("Ingress")["max_chunks_in_flight"] == 2
    knobs = [{"name": "Ingress", "user_config": {"ingress": {"max_chunks_in_flight": 3}, "limits": {"max_fps": 60}}}]

    async def scenario():
        async with websockets.connect(server["url"], max_size=None) as ws:
            await ws.send(init_message(max_chunks=None, size="32x32", num_inference_steps=1, realtime_output_format="raw"))
            await collect(ws, stop_after_chunks=2)
            await asyncio.to_thread(deploy, server["args"], knobs)
            after = await asyncio.to_thread(lambda: {name: describe(name)["replica_id"] for name in before})
            live = await asyncio.to_thread(lambda: describe("Ingress")["max_chunks_in_flight"])
            _, stats, errors, code, _, _ = await collect(ws, stop_after_chunks=10)  # still streaming
            return after, live, stats, errors, code

    try:
        after, live, stats, errors, code = asyncio.run(scenario())
    finally:
        deploy(server["args"])
    assert live == 3
    assert after == before, "a replica was replaced"
    assert code is None and not errors and len(stats) == 10


# ------------------------------------------------------------------------------ targeted attacks


def test_targeted_attacks_are_refused_by_their_wire_field_and_the_server_goes_on(server):
    """Each finding of the abuse runs, against the real server: refused at once, naming the field the
    client sent, with a short reply; the session or the socket goes on."""
    import io

    from PIL import Image

    huge_png = io.BytesIO()
    Image.new("RGBA", (6300, 6300), (1, 2, 3, 4)).save(huge_png, format="PNG")  # ~150 KB, 40 MP decoded
    attacks = [  # (the field the reply must name, what it says, the message)
        ("fps", "must be in", init_message(fps=1e-300)),
        ("first_frame", "not a regular file", init_message(first_frame=os.path.join(server["frames"], "fifo.png"))),
        ("first_frame", "NUL byte", init_message(first_frame=os.path.join(server["frames"], "a\x00b.png"))),
        ("first_frame", "pixels", init_message(first_frame=huge_png.getvalue())),
        ("realtime_causal_kv_cache_num_frames", "must be at least", init_message(realtime_causal_kv_cache_num_frames=1)),
        ("realtime_output_format", "", init_message(realtime_output_format="webp" * 1_000_000)),
    ]

    async def scenario():
        replies = []
        async with websockets.connect(server["url"], max_size=None) as ws:
            for _, _, message in attacks:
                started = time.monotonic()
                await ws.send(message)
                replies.append((msgspec.msgpack.decode(await asyncio.wait_for(ws.recv(), 60)), time.monotonic() - started))
            # the same socket then streams, and a 4 MB prompt event is refused while it goes on
            await ws.send(init_message(max_chunks=None, size="32x32", num_inference_steps=1, realtime_output_format="raw"))
            await collect(ws, stop_after_chunks=1)
            await ws.send(msgspec.msgpack.encode({"type": "event", "kind": "prompt", "payload": "p" * 4_000_000, "event_id": 5}))
            batches, stats, errors, code, _, _ = await collect(ws, stop_after_chunks=3)
        return replies, errors, stats, code

    replies, errors, stats, code = asyncio.run(scenario())
    for (field, says, _), (reply, seconds) in zip(attacks, replies):
        assert reply["content"] == "invalid generate request", (field, reply)
        assert reply["detail"].startswith(field + "=") and says in reply["detail"], (field, reply["detail"][:300])
        assert len(reply["detail"]) < 400 and seconds < 10, (field, seconds, reply["detail"][:200])
    assert len(errors) == 1 and errors[0]["detail"].startswith("payload=") and "longer than" in errors[0]["detail"]
    assert code is None and len(stats) == 3 and all(s["event_id"] is None for s in stats)  # refused: never sampled
    longest = max(len(line) for line in ingress_log_lines(server))
    assert longest < 2200, f"a log line of {longest} characters"
