"""Session-aware autoscaling (lingbot_ray/serve/autoscaling.py): the policy's arithmetic, a replica's
drain and retirement, and the whole protocol on a real Ray cluster with streaming sessions."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import pathlib
import time
import types

import msgspec
import pytest

from lingbot_ray.protocol import CapacityError
from lingbot_ray.serve import autoscaling
from lingbot_ray.serve.autoscaling import Drain, SessionSlotPolicy
from lingbot_ray.serve.config import load_config
from tests.cluster import serve_cluster


class Board:
    """An in-memory drain board, shared by a policy and replicas like the GCS key it stands for."""

    marks: set[str] = set()

    def __init__(self, app="", deployment=""):
        pass

    def read(self) -> set[str]:
        return set(Board.marks)

    def write(self, replicas: set[str]) -> None:
        Board.marks = set(replicas)


@pytest.fixture
def board(monkeypatch):
    Board.marks = set()
    monkeypatch.setattr(autoscaling, "DrainBoard", Board)
    return Board


@dataclasses.dataclass(frozen=True)
class ReplicaID:  # what the policy reads of Serve's ReplicaID
    unique_id: str


def series(value: float):
    return [types.SimpleNamespace(timestamp=time.time(), value=value)]


def context(sessions: dict[str, float | None], target: int, state: dict, low=1, high=4, retired=()):
    """A policy context; a replica whose count is ``None`` is running but has not reported yet."""
    replicas = {uid: ReplicaID(uid) for uid in sessions}
    return types.SimpleNamespace(
        app_name="app",
        deployment_name="DiTGroup",
        running_replicas=list(replicas.values()),
        target_num_replicas=target,
        capacity_adjusted_min_replicas=low,
        capacity_adjusted_max_replicas=high,
        policy_state=state,
        raw_metrics={
            "sessions": {replicas[uid]: series(n) for uid, n in sessions.items() if n is not None},
            "retired": {replicas[uid]: series(float(uid in retired)) for uid in sessions},
        },
    )


def test_policy_scales_up_at_once_and_down_only_by_draining_the_emptiest(board):
    policy = SessionSlotPolicy(slots_per_replica=2, target_free_slots=1)
    assert policy(context({"a": 0}, 1, {})) == (1, {"draining": []})
    # a full group wants a second one now: 2 sessions + 1 free slot need 2 groups of 2
    target, state = policy(context({"a": 2}, 1, {}))
    assert target == 2 and state["draining"] == []
    # the second group is starting: nothing more
    assert policy(context({"a": 2}, 2, state))[0] == 2
    # a's sessions end while b holds one: one group is enough, and a (empty) drains, not b;
    # the target stays, so that Serve stops nothing yet (it would pick b, the newest)
    target, state = policy(context({"a": 0, "b": 1}, 2, state))
    assert (target, state["draining"], board.marks) == (2, ["a"], {"a"})
    # a retired and Serve stopped it (and scheduled a replacement): now the target drops by one
    target, state = policy(context({"b": 1}, 2, state))
    assert (target, state["draining"], board.marks) == (1, [], set())
    assert policy(context({"b": 1}, 1, state)) == (1, {"draining": []})


def test_policy_takes_drained_replicas_back_before_starting_more(board):
    policy = SessionSlotPolicy(slots_per_replica=1, target_free_slots=0)
    target, state = policy(context({"a": 1, "b": 0, "c": 0}, 3, {}))
    assert target == 3 and state["draining"] == ["b", "c"]
    # two sessions arrive (on a replica that still had room): one drained replica comes back, the
    # one already retiring is left to go
    target, state = policy(context({"a": 1, "b": 1, "c": 0}, 3, state))
    assert target == 3 and state["draining"] == ["c"]
    target, state = policy(context({"a": 1, "b": 1, "c": 1}, 3, state, retired=("c",)))
    assert target == 4 and state["draining"] == ["c"]  # c retires anyway: one more starts


def test_policy_never_drains_on_a_missing_count_but_still_scales_up(board):
    policy = SessionSlotPolicy(slots_per_replica=2, target_free_slots=1)
    # b's report is missing (just started, or it timed out on a busy host): it may hold sessions
    assert policy(context({"a": 0, "b": None}, 2, {})) == (2, {"draining": []})
    assert board.marks == set()
    # what is known already needs more: the scale-up does not wait
    wide = SessionSlotPolicy(slots_per_replica=1, target_free_slots=2)
    assert wide(context({"a": 1, "b": None}, 2, {}))[0] == 3
    # once b reports, the empty one drains
    assert policy(context({"a": 0, "b": 1}, 2, {})) == (2, {"draining": ["a"]})


def test_a_draining_replica_that_holds_sessions_swaps_with_an_emptier_serving_one(board):
    policy = SessionSlotPolicy(slots_per_replica=4, target_free_slots=1)
    # b was drained while empty, but a session landed on it before it read its mark; a's ended since
    target, state = policy(context({"a": 0, "b": 1}, 2, {"draining": ["b"]}))
    assert (target, state["draining"], board.marks) == (2, ["a"], {"a"})
    # equal counts: no swap back and forth
    target, state = policy(context({"a": 1, "b": 1}, 2, state))
    assert (target, state["draining"]) == (2, ["a"])
    # a retiring replica is not taken back: it takes no session any more
    target, state = policy(context({"a": 1, "b": 0}, 2, {"draining": ["a"]}, retired=("a",)))
    assert state["draining"] == ["a"]


def test_policy_cuts_replicas_still_starting_first(board):
    policy = SessionSlotPolicy(slots_per_replica=2, target_free_slots=1)
    # target 3 with one running: two are starting, and a quiet deployment wants one
    target, state = policy(context({"a": 0}, 3, {}))
    assert target == 1 and state["draining"] == [] and board.marks == set()


def test_drained_replica_retires_only_after_being_empty_for_drain_s(board):
    from lingbot_ray.serve.deployments import _StageReplica

    class Replica(_StageReplica):
        host = {}

    async def scenario():
        stage = Replica(capacity=2, idle_timeout_s=600)
        stage.drain = Drain(Board(), "r1", drain_s=0.3)
        await stage.open_session("s1")
        assert await stage.record_routing_stats() == {"sessions": 1, "capacity": 2}
        Board.marks = {"r1"}
        # draining: the routers see no free slot; its session goes on
        assert await stage.record_routing_stats() == {"sessions": 1, "capacity": 1}
        await asyncio.sleep(0.4)
        await stage.record_routing_stats()
        assert not stage.drain.retired  # it still holds s1
        await stage.close_session("s1")
        await stage.record_routing_stats()
        # a session that arrives while it drains (all other replicas were full) keeps it alive
        await stage.open_session("s2")
        await asyncio.sleep(0.4)
        await stage.record_routing_stats()
        assert not stage.drain.retired
        stage.check_health()
        await stage.close_session("s2")
        await stage.record_routing_stats()
        await asyncio.sleep(0.4)
        await stage.record_routing_stats()
        assert stage.drain.retired and stage.record_autoscaling_stats() == {"sessions": 0.0, "retired": 1.0}
        with pytest.raises(CapacityError, match="retiring"):
            await stage.open_session("s3")
        with pytest.raises(RuntimeError, match="retired"):
            stage.check_health()
        Board.marks = set()  # taken off the board too late: a retired replica stays retired
        await stage.record_routing_stats()
        assert stage.drain.retired

    asyncio.run(scenario())


def test_autoscaling_config_becomes_serve_options():
    from lingbot_ray.serve.config import deployment_options

    config = load_config({"dit": {"sessions_per_group": 2, "autoscaling": {"max_replicas": 3, "drain_s": 5}}})
    options = deployment_options(config)["DiTGroup"]
    assert options["num_replicas"] == "auto" and options["health_check_period_s"] == 10.0
    scaling = options["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["initial_replicas"], scaling["max_replicas"]) == (1, 1, 3)
    assert scaling["policy"] == {
        "policy_function": "lingbot_ray.serve.autoscaling:SessionSlotPolicy",
        "policy_kwargs": {"slots_per_replica": 2, "target_free_slots": 1},
    }
    assert deployment_options(load_config({}))["DiTGroup"]["num_replicas"] == 1
    for bad, named in (
        ({"dit": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}}, "min_replicas=3"),
        ({"vae": {"autoscaling": {"target_free_slots": -1}}}, "target_free_slots=-1"),
        ({"text_encoder": {"autoscaling": {}}}, "text_encoder.autoscaling"),
        ({"dit": {"autoscaling": {"max_groups": 2}}}, "max_groups"),
    ):
        with pytest.raises(ValueError, match=named):
            load_config(bad)


# ------------------------------------------------------------------------------ a real cluster


APP = "scaling"
SAMPLE = pathlib.Path(autoscaling.__file__).parents[1] / "webui" / "samples" / "world-bricks.png"


@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("ray")
    from ray import serve

    from lingbot_ray.serve.app import build_app

    # replicas push their session counts to the controller every 0.5 s (Serve's default: 10 s)
    os.environ["RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "0.5"
    try:
        with serve_cluster("la", num_cpus=4) as ray_cluster:
            args = {
                "model": {"torch_threads": 1},
                "dit": {
                    "sessions_per_group": 2,
                    "num_cpus_per_rank": 0.5,
                    "compile": "default",  # each new group compiles and warms up before it is ready
                    "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_free_slots": 1, "drain_s": 1, "health_check_period_s": 1},
                },
                "vae": {"num_cpus": 0.5, "sessions_per_replica": 8},
                "text_encoder": {"num_cpus": 0.1},
                "ingress": {"num_cpus": 0.1},
            }
            serve.run(build_app(args), name=APP, route_prefix="/")
            yield {"url": f"ws://127.0.0.1:{ray_cluster.port}/v1/realtime_video/generate", "serve": serve, "logs": os.path.join(ray_cluster.root, "ray")}
    finally:
        os.environ.pop("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", None)


class Stream:
    """One streaming session: counts chunks until told to stop, then closes normally."""

    def __init__(self, url: str, seed: int):
        self.url, self.seed = url, seed
        self.chunks = 0
        self.replicas: set[str] = set()  # the DiT groups its chunk_stats name
        self.stop = asyncio.Event()
        self.ended: tuple[int | None, str] | None = None  # how the server ended it, if it did

    async def run(self) -> None:
        import websockets

        async with websockets.connect(self.url, max_size=None) as ws:
            init = {"type": "init", "prompt": "a street", "first_frame": SAMPLE.read_bytes(), "seed": self.seed, "max_chunks": 10**6}
            await ws.send(msgspec.msgpack.encode(init))
            try:
                while not self.stop.is_set():
                    try:
                        raw = await asyncio.wait_for(ws.recv(), 0.5)
                    except asyncio.TimeoutError:
                        continue
                    message = msgspec.msgpack.decode(raw)
                    if message["type"] == "chunk_stats":
                        self.chunks += 1
                        self.replicas.add(message["replica_id"])
                    elif message["type"] == "error":
                        self.ended = (None, message.get("message", ""))
            except websockets.ConnectionClosed as closed:
                self.ended = (closed.rcvd.code if closed.rcvd else None, closed.rcvd.reason if closed.rcvd else "")

    async def chunks_after(self, at_least: int, timeout_s: float = 120) -> None:
        start = self.chunks
        deadline = time.monotonic() + timeout_s
        while self.chunks < start + at_least:
            assert self.ended is None, f"session {self.seed} ended: {self.ended}"
            assert time.monotonic() < deadline, f"session {self.seed}: {self.chunks - start} chunks in {timeout_s} s"
            await asyncio.sleep(0.1)


def dit_replicas(serve) -> dict[str, int]:
    return dict(serve.status().applications[APP].deployments["DiTGroup"].replica_states)


def one_group_serves(serve) -> bool:
    """One DiT group running and none starting; a retired group or a cancelled replacement may still
    be STOPPING (Serve waits up to its graceful shutdown timeout): neither takes sessions any more."""
    states = dit_replicas(serve)
    return states.get("RUNNING") == 1 and not states.get("STARTING")


def controller_log(logs: str, lines: int = 25) -> str:
    """The controller's last DiTGroup lines: what it scaled, drained and stopped, for a failure message."""
    found = [
        line.rstrip()[:220]
        for path in sorted({path.resolve() for path in pathlib.Path(logs).glob("session_*/logs/serve/controller_*.log")})
        for line in path.read_text(errors="replace").splitlines()
        if "DiTGroup" in line
    ]
    return "\n".join(found[-lines:])


async def until(condition, timeout_s: float, what: str, logs: str | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}" + (f"\n{controller_log(logs)}" if logs else ""))
        await asyncio.sleep(0.25)


def test_sessions_arrive_a_group_starts_they_end_the_empty_group_goes_and_no_session_drops(cluster):
    """Two sessions fill the first group (2 slots) and the free-slot target starts a second; a third
    session lands there. When the first two end, one group is enough: the policy drains the empty
    first group, which retires, and the second (the one Serve would have stopped by itself, the
    newest) keeps streaming its session throughout."""
    serve = cluster["serve"]
    assert dit_replicas(serve) == {"RUNNING": 1}

    async def scenario():
        first, second, third = (Stream(cluster["url"], seed) for seed in (1, 2, 3))
        tasks = [asyncio.create_task(first.run()), asyncio.create_task(second.run())]
        await first.chunks_after(2)
        await second.chunks_after(2)
        await until(lambda: dit_replicas(serve).get("RUNNING") == 2, 120, "a second DiT group starts", cluster["logs"])
        tasks.append(asyncio.create_task(third.run()))
        await third.chunks_after(2)
        assert first.replicas == second.replicas and len(third.replicas) == 1 and third.replicas != first.replicas

        first.stop.set()
        second.stop.set()
        await until(lambda: one_group_serves(serve), 120, "the emptied group is removed", cluster["logs"])
        await third.chunks_after(3)  # it streamed through the scale-down and goes on, on its group
        assert len(third.replicas) == 1
        # the replacement Serve scheduled for the retired group was stopped before it ran
        await asyncio.sleep(2)
        assert one_group_serves(serve), (dit_replicas(serve), controller_log(cluster["logs"]))
        third.stop.set()
        await asyncio.gather(*tasks)
        assert first.ended is second.ended is third.ended is None

    asyncio.run(scenario())
