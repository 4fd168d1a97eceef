"""Prometheus metrics of the ingress (exported by each Ray node in Prometheus format; Ray adds the
``_total`` suffix to counters and the deployment/replica/application tags)."""

from __future__ import annotations

import threading
import time

from ray.serve.metrics import Counter, Gauge, Histogram

_MS_BUCKETS = [10, 25, 50, 100, 200, 400, 800, 1600, 3200, 6400, 12800]
_STAGES = ("text_encoder", "dit", "vae", "postprocess", "queue_wait", "raw_payload_build", "ws_write", "chunk_total")
# Ray's metrics agent drops a gauge series about two report intervals (20 s by default) after its last
# set, so a session count that holds still would vanish from Prometheus: it is set again this often.
GAUGE_REFRESH_S = 5.0


def _every(seconds: float, name: str, fn) -> None:
    """Run ``fn`` every ``seconds`` on a daemon thread (gauges must be set again: see above)."""

    def loop():
        while True:
            time.sleep(seconds)
            fn()

    threading.Thread(target=loop, name=name, daemon=True).start()


class TextCacheMetrics:
    """Size of the text encoder's prompt cache: bounded, and exported so an operator sees it."""

    def __init__(self, model: str, cache_stats):
        self._entries = Gauge("lingbot_text_cache_entries", "Prompts cached by this text encoder replica.", tag_keys=("model",))
        self._bytes = Gauge("lingbot_text_cache_bytes", "Bytes held by this text encoder replica's prompt cache.", tag_keys=("model",))
        for gauge in (self._entries, self._bytes):
            gauge.set_default_tags({"model": model})
        self._cache_stats = cache_stats
        self.update()
        _every(GAUGE_REFRESH_S, "lingbot-text-cache-metrics", self.update)

    def update(self) -> None:
        entries, size = self._cache_stats()
        self._entries.set(entries)
        self._bytes.set(size)


class IngressMetrics:
    def __init__(self, model: str):
        tags = {"model": model}
        self._sessions = Gauge("lingbot_sessions_active", "Open realtime sessions on this ingress replica.", tag_keys=("model",))
        self._sessions.set_default_tags(dict(tags))
        self._started = Counter("lingbot_sessions_started", "Realtime sessions started.", tag_keys=("model",))
        self._started.set_default_tags(dict(tags))
        self._rejected = Counter(
            "lingbot_sessions_rejected", "Sessions refused before streaming, by reason.", tag_keys=("model", "reason")
        )
        self._rejected.set_default_tags(dict(tags))
        self._frames = Counter("lingbot_frames_generated", "Frames generated and sent.", tag_keys=("model",))
        self._frames.set_default_tags(dict(tags))
        self._fps = Gauge("lingbot_generated_fps", "Generated frames per second of the last chunk.", tag_keys=("model",))
        self._fps.set_default_tags(dict(tags))
        self._latency = Histogram(
            "lingbot_chunk_stage_ms", "Per-chunk latency by stage (ms).", boundaries=_MS_BUCKETS, tag_keys=("model", "stage")
        )
        self._latency.set_default_tags(dict(tags))
        self._active = 0
        self._sessions.set(0)
        _every(GAUGE_REFRESH_S, "lingbot-metrics-refresh", lambda: self._sessions.set(self._active))

    def session_started(self) -> None:
        self._active += 1
        self._started.inc()
        self._sessions.set(self._active)

    def session_ended(self) -> None:
        self._active = max(0, self._active - 1)
        self._sessions.set(self._active)

    def session_rejected(self, reason: str) -> None:
        self._rejected.inc(tags={"reason": reason})

    def chunk_done(self, stats) -> None:
        self._frames.inc(stats.num_frames)
        if stats.chunk_total_ms:
            self._fps.set(stats.num_frames * 1000.0 / stats.chunk_total_ms)
        for stage in _STAGES:
            self._latency.observe(getattr(stats, f"{stage}_ms"), tags={"stage": stage})
