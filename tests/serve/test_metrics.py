"""The service's metrics without Ray: what is declared, what the dashboard asks for, and what a
session records (fake Counter/Gauge/Histogram classes stand in for ``ray.serve.metrics``)."""

from __future__ import annotations

import asyncio
import json
import pathlib
import re
import types
from dataclasses import dataclass

import msgspec
import pytest
import websockets

from lingbot_ray.engine.hosts import SessionHost
from lingbot_ray.engine.messages import StageTimings
from lingbot_ray.serve import metrics as m

DASHBOARD = pathlib.Path(__file__).resolve().parents[2] / "docs" / "grafana" / "lingbot-ray.json"
RESERVED_TAGS = {"deployment", "replica", "application"}  # Ray Serve adds them itself


# -- fakes of ray.serve.metrics -------------------------------------------------------------------


class FakeClasses:
    """A stand-in for :mod:`ray.serve.metrics` that keeps every record, by metric name."""

    def __init__(self):
        self.made: dict[str, _FakeMetric] = {}
        registry = self.made

        class Base(_FakeMetric):
            def __init__(self, name, description="", tag_keys=None, boundaries=None):
                super().__init__(name, description, tag_keys, boundaries)
                assert name not in registry, f"{name} made twice"
                registry[name] = self

        self.Counter = type("Counter", (Base,), {"kind": "counter"})
        self.Gauge = type("Gauge", (Base,), {"kind": "gauge"})
        self.Histogram = type("Histogram", (Base,), {"kind": "histogram"})

    def __getitem__(self, name: str) -> _FakeMetric:
        return self.made[name]


class _FakeMetric:
    kind = ""

    def __init__(self, name, description, tag_keys, boundaries):
        declared = m.METRICS[name]
        assert declared.kind == self.kind and tuple(tag_keys) == declared.tag_keys, name
        assert isinstance(tag_keys, tuple), "Ray wants a tuple of tag keys"
        if self.kind == "histogram":
            assert list(boundaries) == sorted(boundaries) and all(b > 0 for b in boundaries)
        self.name, self.tag_keys = name, tag_keys
        self.default_tags: dict[str, str] = {}
        self.records: list[tuple[float, dict[str, str]]] = []

    def set_default_tags(self, tags):
        self.default_tags = dict(tags)

    def _record(self, value, tags):
        merged = {**self.default_tags, **(tags or {})}
        assert set(merged) == set(self.tag_keys), (self.name, merged)
        self.records.append((value, merged))

    def inc(self, value=1.0, tags=None):
        assert self.kind == "counter"
        if value <= 0:  # as Ray does
            raise ValueError(f"value must be >0, got {value}")
        self._record(value, tags)

    def set(self, value, tags=None):
        assert self.kind == "gauge"
        self._record(value, tags)

    def observe(self, value, tags=None):
        assert self.kind == "histogram"
        self._record(value, tags)

    def values(self, **tags) -> list[float]:
        return [value for value, have in self.records if all(have.get(k) == v for k, v in tags.items())]

    @property
    def last(self) -> float:
        return self.records[-1][0]


# -- what is declared -----------------------------------------------------------------------------


def test_metric_names_and_tags_are_valid_for_prometheus_and_ray():
    for name, metric in m.METRICS.items():
        assert re.fullmatch(r"lingbot_[a-z0-9_]+", name), name
        assert not name.endswith("_total"), f"{name}: Ray adds _total to counters"
        assert not RESERVED_TAGS & set(metric.tag_keys), f"{name}: deployment/replica/application are Ray's"
        assert metric.tag_keys[0] == "model"
    # every histogram has its exact-sum counter beside it, with the same tags
    for name, metric in m.METRICS.items():
        if metric.kind == "histogram":
            exact = m.METRICS[f"{name}_exact_sum"]
            assert exact.kind == "counter" and exact.tag_keys == metric.tag_keys
    # the chunk's own latency is not a stage
    assert "chunk_total" not in m.MODEL_STAGES + tuple(m.INGRESS_STAGES)
    assert "lingbot_generated_fps" not in m.METRICS  # a last-writer gauge: rate(frames) instead


def test_exported_series_follow_rays_naming():
    series = m.exported_series()
    assert {"ray_lingbot_sessions_started_total", "ray_lingbot_sessions_active"} <= series
    assert {"ray_lingbot_chunk_latency_ms_bucket", "ray_lingbot_chunk_latency_ms_count", "ray_lingbot_chunk_latency_ms_sum"} <= series
    assert "ray_lingbot_chunk_latency_ms_exact_sum_total" in series


# -- the dashboard --------------------------------------------------------------------------------

_FUNCTIONS = {
    "abs", "avg", "avg_over_time", "ceil", "clamp_max", "clamp_min", "count", "delta", "deriv", "floor",
    "histogram_quantile", "increase", "irate", "label_replace", "label_values", "max", "max_over_time", "min",
    "min_over_time", "quantile", "rate", "round", "scalar", "sort", "sort_desc", "sum", "sum_over_time", "topk",
    "bottomk", "vector", "absent",
}
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana ``label_values`` query) reads."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery durations
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)  # label lists
    if text.lstrip().startswith("label_values("):  # label_values(metric, label): the label is no metric
        text = re.sub(r",\s*[A-Za-z_]\w*\s*\)", ")", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][\w:]*", text):
        word = match.group(0)
        following = text[match.end():].lstrip()[:1]
        if following == "(":
            assert word in _FUNCTIONS, f"unknown function {word} in {expr}"
        elif word not in _KEYWORDS:
            names.add(word)
    return names


def test_the_parser_reads_names_and_leaves_out_the_rest():
    expr = 'histogram_quantile(0.95, sum by (le, stage) (rate(ray_x_bucket{model=~"$model", a="b{c}"}[$__rate_interval])))'
    assert metric_names(expr) == {"ray_x_bucket"}
    assert metric_names("sum(rate(a_total[5m])) / sum(rate(b_count[5m])) * 60") == {"a_total", "b_count"}
    assert metric_names("ray_g") == {"ray_g"}
    assert metric_names("label_values(ray_g, model)") == {"ray_g"}


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard: dict):
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows keep theirs inside


def test_every_dashboard_query_names_only_exported_metrics():
    dashboard = _dashboard()
    exported = m.exported_series()
    used = set()
    panels = [p for p in _panels(dashboard) if p["type"] != "row"]
    assert len(panels) >= 12
    for panel in panels:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        assert panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            names = metric_names(target["expr"])
            assert names, f"panel {panel['title']!r}: {target['expr']!r} reads no metric"
            unknown = names - exported
            assert not unknown, f"panel {panel['title']!r} reads {sorted(unknown)}, which the code does not export"
            used |= names
    variables = dashboard["templating"]["list"]
    assert any(v["type"] == "datasource" and v["query"] == "prometheus" for v in variables)
    for variable in variables:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            assert metric_names(query) <= exported and metric_names(query), query
    # and the other way: every metric the code declares is on the dashboard
    for name, metric in m.METRICS.items():
        assert used & set(metric.series()), f"{name} is exported but no panel shows it"


def test_the_dashboard_takes_means_from_the_exact_sums_and_quantiles_from_buckets():
    exprs = [t["expr"] for p in _panels(_dashboard()) if p["type"] != "row" for t in p["targets"]]
    for histogram in ("lingbot_chunk_latency_ms", "lingbot_chunk_stage_ms", "lingbot_time_to_first_frame_ms", "lingbot_event_latency_ms"):
        assert any(f"ray_{histogram}_exact_sum_total" in e and f"ray_{histogram}_count" in e for e in exprs), histogram
        assert any("histogram_quantile" in e and f"ray_{histogram}_bucket" in e for e in exprs), histogram
    assert not any(re.search(r"_ms_sum\b", e) for e in exprs), "a histogram's _sum is bucket midpoints in Ray"
    assert any("rate(ray_lingbot_frames_generated_total" in e for e in exprs)


# -- what is recorded -----------------------------------------------------------------------------


@dataclass
class Stats:
    """The ChunkStats fields the metrics read."""

    chunk_total_ms: int
    num_frames: int = 9
    ws_payload_bytes: int = 1000
    event_id: int | None = None
    text_encoder_ms: int = 0
    dit_ms: int = 0
    vae_ms: int = 0
    postprocess_ms: int = 0
    queue_wait_ms: int = 0
    raw_payload_build_ms: int = 3
    ws_write_ms: int = 1


def _ingress(fake: FakeClasses, slots=None) -> m.IngressMetrics:
    return m.IngressMetrics("tiny", slots=slots, classes=fake)


def test_stages_are_recorded_only_when_they_ran_and_the_chunk_latency_on_its_own():
    fake = FakeClasses()
    session = _ingress(fake).for_session()
    timings = [
        StageTimings(dit_ms=40.2, vae_ms=10.1),
        StageTimings(text_encoder_ms=0.3, dit_ms=41.0, vae_ms=9.0),  # the prompt changed: encoded
        StageTimings(dit_ms=39.0, vae_ms=11.0),
    ]
    for index, timing in enumerate(timings):
        session.chunk_sent(Stats(chunk_total_ms=60 + index), timing, sampled_at=index, sent_at=index + 0.06)
    stage = fake["lingbot_chunk_stage_ms"]
    assert stage.values(stage="text_encoder") == [0.3]  # a stage that ran under 1 ms still counts
    assert stage.values(stage="dit") == [40.2, 41.0, 39.0] and len(stage.values(stage="vae")) == 3
    assert stage.values(stage="postprocess") == []
    assert len(stage.values(stage="queue_wait")) == 3  # the ingress's parts always run, 0 ms included
    assert {tags["stage"] for _, tags in stage.records} == {"text_encoder", "dit", "vae", "queue_wait", "encode", "ws_write"}
    assert fake["lingbot_chunk_latency_ms"].values() == [60, 61, 62]
    assert fake["lingbot_chunks_sent"].values() == [1, 1, 1]
    assert sum(fake["lingbot_frames_generated"].values()) == 27
    assert sum(fake["lingbot_bytes_sent"].values()) == 3000
    assert all(tags["model"] == "tiny" for _, tags in stage.records)


def test_exact_sum_counters_equal_the_sum_of_observations():
    fake = FakeClasses()
    ingress = _ingress(fake)
    session = ingress.for_session()
    session.init_received(0.0)
    session.event_received(1, 0.01)
    for index, total in enumerate([0, 0, 0, 0, 17, 1234]):  # four 0 ms: Ray's _sum would read 20
        timings = StageTimings(dit_ms=total / 2, vae_ms=0.25 * index)
        session.chunk_sent(Stats(chunk_total_ms=total, queue_wait_ms=index % 2, event_id=1), timings, sampled_at=0.02 + index, sent_at=0.5 + index)
    checked = 0
    for name, metric in m.METRICS.items():
        if metric.kind != "histogram" or name not in fake.made:
            continue
        histogram, exact = fake[name], fake[f"{name}_exact_sum"]
        for stage in {tags.get("stage") for _, tags in histogram.records}:
            tags = {"stage": stage} if stage else {}
            assert sum(exact.values(**tags)) == pytest.approx(sum(histogram.values(**tags))), (name, stage)
            checked += 1
    assert checked >= 8
    assert sum(fake["lingbot_chunk_latency_ms_exact_sum"].values()) == 1251


def test_time_to_first_frame_once_per_session():
    fake = FakeClasses()
    ingress = _ingress(fake)
    first, second = ingress.for_session(), ingress.for_session()
    first.init_received(10.0)
    second.init_received(20.0)
    for index in range(3):
        first.chunk_sent(Stats(chunk_total_ms=5), StageTimings(dit_ms=1), sampled_at=10.1 + index, sent_at=10.5 + index)
    second.chunk_sent(Stats(chunk_total_ms=5), StageTimings(dit_ms=1), sampled_at=20.1, sent_at=22.0)
    assert fake["lingbot_time_to_first_frame_ms"].values() == pytest.approx([500.0, 2000.0])
    assert sum(fake["lingbot_time_to_first_frame_ms_exact_sum"].values()) == pytest.approx(2500.0)


def test_event_latency_once_when_the_first_chunk_under_the_event_is_sent():
    fake = FakeClasses()
    session = _ingress(fake).for_session()
    latency = fake["lingbot_event_latency_ms"]

    def chunk(event_id, sampled_at, sent_at):
        session.chunk_sent(Stats(chunk_total_ms=5, event_id=event_id), StageTimings(dit_ms=1), sampled_at=sampled_at, sent_at=sent_at)

    session.event_received(None, 0.0)  # no id: cannot be told apart, not timed
    chunk(None, 0.1, 0.2)
    session.event_received(7, 1.0)
    chunk(None, 1.1, 1.3)  # its prompt waits for the next boundary
    chunk(7, 1.4, 1.8)  # the first chunk under event 7
    chunk(7, 1.9, 2.2)  # the echo persists: not again
    assert latency.values() == pytest.approx([800.0])
    # an id reused while the old event is still echoed: only a chunk sampled after it counts
    session.event_received(7, 2.5)
    chunk(7, 2.4, 2.7)
    assert len(latency.values()) == 1
    chunk(7, 2.8, 3.0)
    assert latency.values()[-1] == pytest.approx(500.0)
    # bounded: old pending events are pushed out
    for event_id in range(100, 100 + 2 * m.MAX_PENDING_EVENTS):
        session.event_received(event_id, 4.0)
    assert len(session._pending) == m.MAX_PENDING_EVENTS
    chunk(100, 5.0, 5.1)
    assert len(latency.values()) == 2
    chunk(100 + 2 * m.MAX_PENDING_EVENTS - 1, 5.2, 5.5)
    assert latency.values()[-1] == pytest.approx(1500.0)


def test_sessions_and_refusals():
    fake = FakeClasses()
    slots = types.SimpleNamespace(used=0, limit=4)
    ingress = _ingress(fake, slots=lambda: (slots.used, slots.limit))
    session = ingress.for_session()
    slots.used = 1
    session.session_started()
    assert fake["lingbot_sessions_active"].last == 1
    assert (fake["lingbot_session_slots_used"].last, fake["lingbot_session_slots_free"].last) == (1, 3)
    slots.used = 0
    session.session_ended()
    ingress.for_session().session_rejected("CapacityError")
    assert fake["lingbot_sessions_active"].last == 0 and fake["lingbot_session_slots_free"].last == 4
    assert fake["lingbot_sessions_started"].values() == [1] and fake["lingbot_sessions_ended"].values() == [1]
    assert fake["lingbot_sessions_rejected"].records == [(1.0, {"model": "tiny", "reason": "CapacityError"})]


def test_gauges_are_set_again_on_the_replicas_event_loop():
    fake = FakeClasses()
    state = {"used": 0}

    async def scenario():
        metrics = m.ReplicaMetrics("tiny", lambda: (state["used"], 2), classes=fake)
        assert isinstance(metrics._refresher, asyncio.Task)  # no thread per replica
        state["used"] = 2
        await asyncio.sleep(0.05)
        metrics._refresher.cancel()

    original = m.GAUGE_REFRESH_S
    m.GAUGE_REFRESH_S = 0.01
    try:
        asyncio.run(scenario())
    finally:
        m.GAUGE_REFRESH_S = original
    assert fake["lingbot_session_slots_used"].last == 2 and fake["lingbot_session_slots_free"].last == 0
    assert len(fake["lingbot_session_slots_used"].records) >= 2


# -- the sticky replicas' gauges ------------------------------------------------------------------


class _Cache:
    def __init__(self, nbytes):
        self._nbytes = nbytes

    def nbytes(self):
        return self._nbytes


class _State:
    def __init__(self, nbytes):
        self.kv_cache = _Cache(nbytes)

    def release(self):
        self.kv_cache = None


def test_stage_replicas_export_slots_and_dit_groups_their_kv_bytes():
    from lingbot_ray.serve.deployments import RayDiTGroup, _SlotGauges, _StageReplica

    class Replica(_SlotGauges, _StageReplica):
        pass

    fake = FakeClasses()

    async def scenario():
        replica = Replica(capacity=3, idle_timeout_s=60)
        replica.host = SessionHost()
        replica.ranks = types.SimpleNamespace(size=2)  # two ranks, each holding half of every cache
        replica._export_slots("tiny", lambda: RayDiTGroup.kv_cache_bytes(replica), classes=fake)
        used, free, kv = fake["lingbot_session_slots_used"], fake["lingbot_session_slots_free"], fake["lingbot_kv_cache_bytes"]
        assert (used.last, free.last, kv.last) == (0, 3, 0)
        await replica.open_session("a")
        await replica.open_session("b")
        assert (used.last, free.last) == (2, 1)
        replica.host.sessions["a"] = _State(1000)
        replica.host.sessions["b"] = _State(24)
        replica.metrics.update()
        assert kv.last == 2 * 1024
        await replica.close_session("a")
        assert (used.last, free.last, kv.last) == (1, 2, 48)
        replica.metrics._refresher.cancel()

    asyncio.run(scenario())
    assert all(tags == {"model": "tiny"} for _, tags in fake["lingbot_kv_cache_bytes"].records)


# -- one real session in-process (no Ray) ---------------------------------------------------------


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    from lingbot_ray.models.tiny import build_tiny_checkpoint
    from lingbot_ray.serve.local import serve_locally

    checkpoint = tmp_path_factory.mktemp("ckpt") / "tiny"
    build_tiny_checkpoint(checkpoint)
    with serve_locally({"model": {"path": str(checkpoint), "torch_threads": 1}}) as server:
        yield server


def test_a_session_records_each_figure_once(local):
    from tests.serve.test_e2e import collect, init_message

    fake = FakeClasses()
    ingress = local.ingress
    ingress.metrics = m.IngressMetrics(ingress.model_name, slots=lambda: (ingress.sessions.used, ingress.sessions.limit), classes=fake)

    async def session():
        async with websockets.connect(f"{local.url}/v1/realtime_video/generate", max_size=None) as ws:
            await ws.send(init_message(max_chunks=3))
            # a prompt cannot change chunk 0: it is encoded for chunk 1, which echoes its id
            await ws.send(msgspec.msgpack.encode({"type": "event", "kind": "prompt", "event_id": 5, "payload": "a rainy street"}))
            return await collect(ws)

    try:
        _, stats, errors, code, _, _ = asyncio.run(session())
    finally:
        ingress.metrics = None
    assert code == 1000 and not errors, errors
    assert [s["event_id"] for s in stats] == [None, 5, 5]
    stage = fake["lingbot_chunk_stage_ms"]
    assert len(stage.values(stage="text_encoder")) == 1  # only chunk 1 changed the prompt
    assert len(stage.values(stage="dit")) == 3 and stage.values(stage="postprocess") == []
    assert fake["lingbot_chunk_latency_ms"].values() == [s["chunk_total_ms"] for s in stats]
    assert sum(fake["lingbot_frames_generated"].values()) == sum(s["num_frames"] for s in stats)
    assert len(fake["lingbot_time_to_first_frame_ms"].values()) == 1
    (event_ms,) = fake["lingbot_event_latency_ms"].values()
    assert 0 < event_ms < fake["lingbot_time_to_first_frame_ms"].values()[0] + sum(s["chunk_total_ms"] for s in stats)
    assert fake["lingbot_sessions_started"].values() == [1] and fake["lingbot_sessions_ended"].values() == [1]
    assert fake["lingbot_sessions_active"].last == 0 and fake["lingbot_session_slots_used"].last == 0
