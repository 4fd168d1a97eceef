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
        threading.Thread(target=self._refresh, name="lingbot-metrics-refresh", daemon=True).start()

    def _refresh(self) -> None:
        while True:
            time.sleep(GAUGE_REFRESH_S)
            self._sessions.set(self._active)

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
