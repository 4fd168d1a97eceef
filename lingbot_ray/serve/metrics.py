"""Prometheus metrics of the service (exported by each Ray node's metrics agent).

Ray prefixes every application metric with ``ray_``, adds ``_total`` to counters, exports a
histogram as ``_bucket``/``_count``/``_sum`` and adds the ``deployment``, ``replica`` and
``application`` tags itself (they are reserved: no metric here declares them).

Every metric is declared once, in :data:`METRICS` (name, type, tags), so the Grafana dashboard
(``docs/grafana/lingbot-ray.json``) can be checked against what the code exports
(:func:`exported_series`). The metric objects are made only inside Ray replicas (the ``Ray*``
classes of :mod:`.ingress` and :mod:`.deployments`); the in-process backend makes none.

Two rules keep the numbers honest:

* **Exact means.** Ray's metrics agent rebuilds a histogram's ``_sum`` from bucket midpoints (four
  0 ms observations read as ``_sum = 20``), so every histogram has an exact-sum counter beside it,
  ``<histogram>_exact_sum`` (exported ``ray_<histogram>_exact_sum_total``): the exact mean is
  ``rate(ray_X_exact_sum_total) / rate(ray_X_count)`` (bucket counts, hence ``_count``, are exact).
* **Only what happened.** A model stage is recorded for a chunk only when it ran for that chunk
  (the text encoder runs only when the chunk's conditions change the prompt, post-processing only
  for sessions that asked for it); the chunk's total latency is a histogram of its own.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("ray.serve")

PREFIX = "ray_"  # what Ray puts before every application metric's name
# Ray's metrics agent drops a gauge series about two report intervals (20 s by default) after its last
# set, so a value that holds still would vanish from Prometheus: gauges are set again this often.
GAUGE_REFRESH_S = 5.0
# per session: events received and not yet seen in a sent chunk (their receive times)
MAX_PENDING_EVENTS = 64

_CHUNK_MS_BUCKETS = (10, 25, 50, 100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600)
_SLOW_MS_BUCKETS = (50, 100, 250, 500, 1000, 2000, 4000, 8000, 16000, 32000, 64000, 128000, 256000)

# the model stages, recorded only for the chunks they ran for (their StageTimings field is > 0)
MODEL_STAGES = ("text_encoder", "dit", "vae", "postprocess")
# the ingress's own parts of every chunk (they always run): stage label → ChunkStats field
INGRESS_STAGES = {"queue_wait": "queue_wait_ms", "encode": "raw_payload_build_ms", "ws_write": "ws_write_ms"}


# -- declarations ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricDef:
    """One exported metric: Ray's metric name (without ``ray_``), its type and its own tag keys."""

    kind: str  # "counter", "gauge" or "histogram"
    name: str
    description: str
    tag_keys: tuple[str, ...] = ("model",)
    boundaries: tuple[float, ...] = ()

    def series(self) -> tuple[str, ...]:
        """The Prometheus series names Ray exports for it."""
        base = PREFIX + self.name
        if self.kind == "counter":
            return (base + "_total",)
        if self.kind == "histogram":
            return (base + "_bucket", base + "_count", base + "_sum")
        return (base,)


METRICS: dict[str, MetricDef] = {}


def _define(kind: str, name: str, description: str, tag_keys: tuple[str, ...] = ("model",), boundaries=()) -> MetricDef:
    assert name not in METRICS, name
    METRICS[name] = MetricDef(kind, name, description, tag_keys, tuple(boundaries))
    return METRICS[name]


def _timing(name: str, description: str, boundaries, tag_keys: tuple[str, ...] = ("model",)) -> tuple[MetricDef, MetricDef]:
    """A histogram of milliseconds and its exact-sum counter."""
    histogram = _define("histogram", name, description, tag_keys, boundaries)
    exact = _define("counter", f"{name}_exact_sum", f"Exact sum of {name} (ms): the histogram's _sum is approximate.", tag_keys)
    return histogram, exact


# ingress: sessions
SESSIONS_ACTIVE = _define("gauge", "lingbot_sessions_active", "Open realtime sessions on this ingress replica.")
SESSIONS_STARTED = _define("counter", "lingbot_sessions_started", "Realtime sessions started (opened on every stage).")
SESSIONS_ENDED = _define("counter", "lingbot_sessions_ended", "Realtime sessions ended after they started.")
SESSIONS_REJECTED = _define(
    "counter", "lingbot_sessions_rejected", "Sessions refused before streaming, by reason.", ("model", "reason")
)
# ingress: chunks
CHUNKS_SENT = _define("counter", "lingbot_chunks_sent", "Chunks generated and sent.")
FRAMES_GENERATED = _define("counter", "lingbot_frames_generated", "Frames generated and sent (rate() is the generated fps).")
BYTES_SENT = _define("counter", "lingbot_bytes_sent", "WebSocket payload bytes of the frames sent.")
CHUNK_LATENCY = _timing(
    "lingbot_chunk_latency_ms", "Per-chunk latency (ms): conditions sampled to chunk sent.", _CHUNK_MS_BUCKETS
)
CHUNK_STAGE = _timing(
    "lingbot_chunk_stage_ms",
    "Per-chunk time by stage (ms), recorded only for the chunks a stage ran for.",
    _CHUNK_MS_BUCKETS,
    ("model", "stage"),
)
TIME_TO_FIRST_FRAME = _timing(
    "lingbot_time_to_first_frame_ms", "Valid init received to the first chunk's frames sent (ms).", _SLOW_MS_BUCKETS
)
EVENT_LATENCY = _timing(
    "lingbot_event_latency_ms",
    "Client event received to the frames of the first chunk generated under it sent (ms).",
    _CHUNK_MS_BUCKETS,
)
# every sticky replica (DiT group, VAE decoder, post-process) and the ingress
SLOTS_USED = _define("gauge", "lingbot_session_slots_used", "Session slots held on this replica.")
SLOTS_FREE = _define("gauge", "lingbot_session_slots_free", "Session slots free on this replica.")
# DiT groups
KV_CACHE_BYTES = _define(
    "gauge", "lingbot_kv_cache_bytes", "Bytes of the KV caches of the sessions this DiT group holds (all its ranks)."
)
# text encoders
TEXT_CACHE_ENTRIES = _define("gauge", "lingbot_text_cache_entries", "Prompts cached by this text encoder replica.")
TEXT_CACHE_BYTES = _define("gauge", "lingbot_text_cache_bytes", "Bytes held by this text encoder replica's prompt cache.")


def exported_series() -> set[str]:
    """Every Prometheus series name the code exports (what a dashboard query may name)."""
    return {series for metric in METRICS.values() for series in metric.series()}


# -- making them -----------------------------------------------------------------------------------


def _ray_classes():
    from ray.serve import metrics

    return metrics


def make(metric: MetricDef, model: str, classes=None):
    """The metric object, with its ``model`` tag set. ``classes`` provides ``Counter``, ``Gauge``
    and ``Histogram`` (default: :mod:`ray.serve.metrics`; tests pass fakes)."""
    classes = classes or _ray_classes()
    if metric.kind == "histogram":
        made = classes.Histogram(metric.name, metric.description, boundaries=list(metric.boundaries), tag_keys=metric.tag_keys)
    else:
        made = {"counter": classes.Counter, "gauge": classes.Gauge}[metric.kind](
            metric.name, metric.description, tag_keys=metric.tag_keys
        )
    made.set_default_tags({"model": model})
    return made


def _inc(counter, value: float, tags: dict[str, str] | None = None) -> None:
    if value > 0:  # Ray's counters refuse 0 (and a 0 adds nothing)
        counter.inc(value, tags=tags)


class Timing:
    """A histogram of milliseconds and its exact-sum counter, recorded together."""

    def __init__(self, pair: tuple[MetricDef, MetricDef], model: str, classes=None):
        self.histogram = make(pair[0], model, classes)
        self.exact_sum = make(pair[1], model, classes)

    def observe(self, ms: float, tags: dict[str, str] | None = None) -> None:
        ms = max(0.0, float(ms))
        self.histogram.observe(ms, tags=tags)
        _inc(self.exact_sum, ms, tags)


def refresh_every(seconds: float, name: str, fn: Callable[[], None]):
    """Call ``fn`` every ``seconds`` (gauges must be set again: see GAUGE_REFRESH_S): one task on the
    running event loop (a replica's constructor runs on its loop), else one daemon thread. Returns
    the task or thread; keep it."""

    def once() -> None:
        try:
            fn()
        except Exception:  # a metric must never take the replica down
            logger.exception("%s: refreshing metrics failed", name)

    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    if loop is not None:

        async def refresh() -> None:
            while True:
                await asyncio.sleep(seconds)
                once()

        return loop.create_task(refresh(), name=name)

    def run() -> None:
        while True:
            time.sleep(seconds)
            once()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


def served_model(config) -> str:
    """The ``model`` tag of every replica: the name the ingress serves, so a dashboard filters the
    ingress and the stages alike."""
    if config.model.served_model_name:
        return config.model.served_model_name
    try:
        from lingbot_ray.checkpoint import CheckpointFacts, ensure_checkpoint

        model = config.model
        folder = ensure_checkpoint(model.path, build_tiny_if_missing=model.build_tiny_if_missing, revision=model.revision, settings=model.checkpoint_settings, weights=False)
        return config.served_name(CheckpointFacts.read(folder).defaults.served_model_name)
    except Exception:  # the tag is a label, not worth failing a replica for
        return config.served_model_name


# -- per replica -----------------------------------------------------------------------------------


class TextCacheMetrics:
    """Size of the text encoder's prompt cache: bounded, and exported so an operator sees it."""

    def __init__(self, model: str, cache_stats, classes=None):
        self._entries = make(TEXT_CACHE_ENTRIES, model, classes)
        self._bytes = make(TEXT_CACHE_BYTES, model, classes)
        self._cache_stats = cache_stats
        self.update()
        self._refresher = refresh_every(GAUGE_REFRESH_S, "lingbot-text-cache-metrics", self.update)

    def update(self) -> None:
        entries, size = self._cache_stats()
        self._entries.set(entries)
        self._bytes.set(size)


class ReplicaMetrics:
    """Session slots of one replica (used and free) and, for a DiT group, its KV caches' bytes.
    ``slots()`` returns ``(used, capacity)``; ``kv_bytes()`` the bytes. Set on every open and
    close (the replica calls :meth:`update`) and every GAUGE_REFRESH_S."""

    def __init__(self, model: str, slots: Callable[[], tuple[int, int]], kv_bytes: Callable[[], int] | None = None, classes=None):
        self._slots = slots
        self._kv_bytes = kv_bytes
        self._used = make(SLOTS_USED, model, classes)
        self._free = make(SLOTS_FREE, model, classes)
        self._kv = make(KV_CACHE_BYTES, model, classes) if kv_bytes is not None else None
        self._last_kv = 0
        self.update()
        self._refresher = refresh_every(GAUGE_REFRESH_S, "lingbot-replica-metrics", self.update)

    def update(self) -> None:
        used, capacity = self._slots()
        self._used.set(used)
        self._free.set(max(0, capacity - used))
        if self._kv is not None:
            try:
                self._last_kv = int(self._kv_bytes())
            except RuntimeError:  # sessions changed under us (model thread): keep the last value
                pass
            self._kv.set(self._last_kv)


class IngressMetrics:
    """The ingress replica's session and chunk metrics. Each session records through its own
    :meth:`for_session` view, which keeps the session's few timestamps."""

    def __init__(self, model: str, slots: Callable[[], tuple[int, int]] | None = None, classes=None):
        def made(metric: MetricDef):
            return make(metric, model, classes)

        self._sessions = made(SESSIONS_ACTIVE)
        self._started = made(SESSIONS_STARTED)
        self._ended = made(SESSIONS_ENDED)
        self._rejected = made(SESSIONS_REJECTED)
        self._chunks = made(CHUNKS_SENT)
        self._frames = made(FRAMES_GENERATED)
        self._bytes = made(BYTES_SENT)
        self._chunk_latency = Timing(CHUNK_LATENCY, model, classes)
        self._stage = Timing(CHUNK_STAGE, model, classes)
        self._ttff = Timing(TIME_TO_FIRST_FRAME, model, classes)
        self._event_latency = Timing(EVENT_LATENCY, model, classes)
        # the ingress's own session slots (streaming sessions / ingress.max_sessions)
        self._slots = ReplicaMetrics(model, slots, classes=classes) if slots is not None else None
        self._active = 0
        self._sessions.set(0)
        self._refresher = refresh_every(GAUGE_REFRESH_S, "lingbot-ingress-metrics", self._refresh)

    def _refresh(self) -> None:
        self._sessions.set(self._active)

    def _slots_changed(self) -> None:
        if self._slots is not None:
            self._slots.update()

    def for_session(self) -> SessionMetrics:
        return SessionMetrics(self)

    # -- aggregate records (a session's view calls these) ----------------------------------------

    def session_started(self) -> None:
        self._active += 1
        self._started.inc()
        self._sessions.set(self._active)
        self._slots_changed()

    def session_ended(self) -> None:
        self._active = max(0, self._active - 1)
        self._ended.inc()
        self._sessions.set(self._active)
        self._slots_changed()

    def session_rejected(self, reason: str) -> None:
        self._rejected.inc(tags={"reason": reason})
        self._slots_changed()

    def chunk_done(self, stats, timings=None) -> None:
        """One chunk sent: its counters, its latency, and the stages that ran for it. ``timings``
        (the chunk's :class:`~lingbot_ray.engine.messages.StageTimings`, unrounded) says which model
        stages ran: a field of 0 is a stage that did not; without it the stats' fields are used."""
        self._chunks.inc()
        _inc(self._frames, stats.num_frames)
        _inc(self._bytes, stats.ws_payload_bytes)
        self._chunk_latency.observe(stats.chunk_total_ms)
        for stage in MODEL_STAGES:
            ms = getattr(timings if timings is not None else stats, f"{stage}_ms")
            if ms > 0:
                self._stage.observe(ms, tags={"stage": stage})
        for stage, field in INGRESS_STAGES.items():
            self._stage.observe(getattr(stats, field), tags={"stage": stage})

    def time_to_first_frame(self, ms: float) -> None:
        self._ttff.observe(ms)

    def event_latency(self, ms: float) -> None:
        self._event_latency.observe(ms)


class SessionMetrics:
    """One session's view of :class:`IngressMetrics`: it remembers when the init came and when each
    pending event came (at most MAX_PENDING_EVENTS, oldest dropped), and turns them into the time to
    first frame (once) and event latencies (once per event) as chunks are sent. An event that is
    never echoed (replaced before it was sampled, or sampled beside one that is echoed instead) stays
    pending until newer ones push it out. Times are
    ``time.perf_counter()`` seconds. The event reader and the sender share one event loop: no lock."""

    def __init__(self, ingress: IngressMetrics, max_pending: int = MAX_PENDING_EVENTS):
        self.ingress = ingress
        self.max_pending = max_pending
        self._init_at: float | None = None
        self._first_sent = False
        self._pending: collections.OrderedDict[Any, float] = collections.OrderedDict()

    def session_started(self) -> None:
        self.ingress.session_started()

    def session_ended(self) -> None:
        self.ingress.session_ended()

    def session_rejected(self, reason: str) -> None:
        self.ingress.session_rejected(reason)

    def init_received(self, at: float) -> None:
        self._init_at = at

    def event_received(self, event_id, at: float) -> None:
        """An event was accepted into the session's condition queue. Events without an id cannot be
        told apart in the chunks, so they are not timed; a reused id takes the newer time (the older
        event was replaced, or is sampled with it)."""
        if event_id is None:
            return
        self._pending.pop(event_id, None)
        self._pending[event_id] = at
        while len(self._pending) > self.max_pending:
            self._pending.popitem(last=False)

    def chunk_sent(self, stats, timings, sampled_at: float, sent_at: float) -> None:
        """A chunk's frames went out at ``sent_at``; its conditions were sampled at ``sampled_at``
        and include the event ``stats.event_id`` (the latest sampled: ConditionQueue's echo)."""
        self.ingress.chunk_done(stats, timings)
        if not self._first_sent:
            self._first_sent = True
            if self._init_at is not None:
                self.ingress.time_to_first_frame(max(0.0, sent_at - self._init_at) * 1e3)
        event_id = stats.event_id
        received = self._pending.get(event_id) if event_id is not None else None
        # only an event received before this chunk's conditions were sampled can be in them (an id
        # the client reused while the old one is still echoed is not this chunk's)
        if received is None or received > sampled_at:
            return
        del self._pending[event_id]
        self.ingress.event_latency(max(0.0, sent_at - received) * 1e3)
