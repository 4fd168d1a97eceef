"""``lingbot-ray bench``: N concurrent sessions against a server, measured as a viewer sees them.

Each session sends the same init (size, format, seed, first frame) and, every ``--event-every``
chunks, a camera state event cycling through held keys, so event latency is measured under load.
Reported, after ``--warmup`` chunks per session:

* time to first frame (init sent → first frame_batch), refused sessions (close 1013);
* generated fps per session (frames of the steady chunks / their span) and in total (the sum);
* p50/p95 of every ``*_ms`` field of ``chunk_stats`` (the protocol's and our per-stage ones);
* event latency (event sent → first frame_batch echoing its id) and received bytes per second.

A progress count runs on stderr; ``--out`` gets the JSON result (summary + every session's stats),
``--plot`` a PNG of chunk latency over time. ``--vs-inprocess`` then serves the app from
``--config`` in this process without Ray, runs the same bench against it, and prints the ratios.

    lingbot-ray bench --sessions 4 --chunks 12 --out bench.json --plot bench.png
    lingbot-ray bench --sessions 1 --duration 30 --format webp --size 320x192 --vs-inprocess
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .consistency import SAMPLE_FIRST_FRAME
from .session import ScheduledEvent, SessionResult, make_init, run_session, ws_url

logger = logging.getLogger(__name__)

EVENT_CYCLE = (["w"], ["l"], [], ["j"], ["s"], [])
STAGE_FIELDS = ("text_encoder_ms", "dit_ms", "vae_ms", "postprocess_ms", "queue_wait_ms")


@dataclass
class BenchSpec:
    url: str
    sessions: int = 1
    chunks: int | None = 12
    duration_s: float | None = None
    output_format: str | None = "raw"
    size: str | None = None
    seed: int = 42
    prompt: str = "a walk through a procedural world"
    first_frame: Path = SAMPLE_FIRST_FRAME
    event_every: int = 2
    warmup: int = 2
    api_key: str | None = None
    timeout_s: float = 300.0
    progress: bool = True
    extra_init: dict[str, Any] = field(default_factory=dict)


def _events(spec: BenchSpec) -> list[ScheduledEvent]:
    if spec.event_every <= 0:
        return []
    horizon = spec.chunks if spec.chunks else 100_000
    events = []
    for n, at_chunk in enumerate(range(1, horizon, spec.event_every)):
        payload = {"mode": "state", "transitions": [{"actions": EVENT_CYCLE[n % len(EVENT_CYCLE)]}]}
        events.append(ScheduledEvent(at_chunk, {"type": "event", "kind": "camera_actions", "payload": payload, "event_id": n + 1}))
    return events


async def _run_all(spec: BenchSpec) -> list[SessionResult | BaseException]:
    init = make_init(
        spec.prompt,
        spec.first_frame.read_bytes(),
        seed=spec.seed,
        max_chunks=spec.chunks if not spec.duration_s else None,
        output_format=spec.output_format,
        size=spec.size,
        **spec.extra_init,
    )
    stop = asyncio.Event()
    timed = bool(spec.duration_s)
    bar = _Progress(
        round(spec.duration_s) if timed else spec.sessions * (spec.chunks or 0),
        "s" if timed else "chunks",
        f"bench {spec.sessions} session(s)",
        enabled=spec.progress,
    )

    async def ticker() -> None:
        start = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.5)
            bar.show(min(bar.total, round(time.monotonic() - start)))
            if time.monotonic() - start >= spec.duration_s:
                stop.set()

    on_stats = None if timed else (lambda _stats: bar.show(bar.done + 1))
    sessions = [
        run_session(ws_url(spec.url), init, events=_events(spec), on_stats=on_stats, stop=stop if timed else None, api_key=spec.api_key, timeout_s=spec.timeout_s)
        for _ in range(spec.sessions)
    ]
    tick = asyncio.create_task(ticker()) if timed else None
    try:
        return await asyncio.gather(*sessions, return_exceptions=True)
    finally:
        stop.set()
        if tick is not None:
            await tick
        bar.close()


class _Progress:
    """``desc: done/total unit`` on one stderr line, rewritten on every change."""

    def __init__(self, total: int, unit: str, desc: str, *, enabled: bool) -> None:
        self.total, self.unit, self.desc, self.enabled = total, unit, desc, enabled
        self.done = 0

    def show(self, done: int) -> None:
        self.done = done
        if self.enabled:
            sys.stderr.write(f"\r{self.desc}: {done}/{self.total} {self.unit}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.done:
            sys.stderr.write("\n")


def run_bench(spec: BenchSpec) -> dict[str, Any]:
    """Run the bench; returns ``{"spec", "summary", "sessions"}`` (JSON-ready)."""
    started = time.time()
    results = asyncio.run(_run_all(spec))
    return {
        "spec": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(spec).items() if k != "api_key"},
        "started_unix_s": started,
        "summary": summarize(results, spec.warmup),
        "sessions": [_session_json(r) for r in results],
    }


def _session_json(result: SessionResult | BaseException) -> dict[str, Any]:
    if isinstance(result, BaseException):
        return {"exception": f"{type(result).__name__}: {result}"}
    return {
        "close_code": result.close_code,
        "close_reason": result.close_reason,
        "errors": result.errors,
        "first_frame_s": result.first_frame_s,
        "frames": result.frames,
        "bytes_received": result.bytes_received,
        "elapsed_s": result.elapsed_s,
        "event_latency_ms": {str(k): v for k, v in result.event_latency_ms.items()},
        "stats_arrival_s": result.stats_arrival_s,
        "stats": result.stats,
    }


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": math.nan, "p95": math.nan, "n": 0}
    return {"p50": float(np.percentile(values, 50)), "p95": float(np.percentile(values, 95)), "n": len(values)}


def steady_fps(result: SessionResult, warmup: int) -> float | None:
    """Frames of the chunks after ``warmup`` over the time they took (from the last warm-up chunk,
    or from init when ``warmup`` is 0)."""
    if len(result.stats) <= warmup:
        return None
    begin = result.stats_arrival_s[warmup - 1] if warmup else 0.0
    span = result.stats_arrival_s[-1] - begin
    frames = sum(s["num_frames"] for s in result.stats[warmup:])
    return frames / span if span > 0 else None


def summarize(results: list[SessionResult | BaseException], warmup: int) -> dict[str, Any]:
    ok = [r for r in results if isinstance(r, SessionResult)]
    served = [r for r in ok if not r.refused]
    fps = [f for r in served if (f := steady_fps(r, warmup)) is not None]
    steady = [s for r in served for s in r.stats[warmup:]]
    fields = sorted({k for s in steady for k, v in s.items() if k.endswith("_ms") and isinstance(v, (int, float))})
    elapsed = max((r.elapsed_s for r in served), default=0.0)
    return {
        "sessions": len(results),
        "refused": sum(r.refused for r in ok),
        "failed": len(results) - len(ok) + sum(bool(r.errors) for r in served),
        "completed": sum(r.completed for r in served),
        "time_to_first_frame_s": _percentiles([r.first_frame_s for r in served if r.first_frame_s is not None]),
        "generated_fps_per_session": _percentiles(fps),
        "generated_fps_total": float(sum(fps)),
        "chunks": len(steady),
        "fields_ms": {name: _percentiles([s[name] for s in steady if name in s]) for name in fields},
        "event_latency_ms": _percentiles([v for r in served for v in r.event_latency_ms.values()]),
        "bytes_per_s_total": float(sum(r.bytes_received for r in served) / elapsed) if elapsed > 0 else 0.0,
        "errors": sorted({e for r in served for e in r.errors} | {f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)}),
    }


def format_summary(summary: dict[str, Any], title: str = "bench") -> str:
    def pair(p: dict[str, float], unit: str = "", digits: int = 0) -> str:
        return f"p50 {p['p50']:.{digits}f}{unit} p95 {p['p95']:.{digits}f}{unit}" if p["n"] else "n/a"

    lines = [
        f"{title}: {summary['sessions']} session(s), {summary['completed']} completed, {summary['refused']} refused, "
        f"{summary['failed']} failed, {summary['chunks']} steady chunks",
        f"  time to first frame     {pair(summary['time_to_first_frame_s'], ' s', 2)}",
        f"  generated fps / session {pair(summary['generated_fps_per_session'], '', 1)}; total {summary['generated_fps_total']:.1f}",
        f"  event latency           {pair(summary['event_latency_ms'], ' ms')} ({summary['event_latency_ms']['n']} events)",
        f"  received                {summary['bytes_per_s_total'] / 1e6:.2f} MB/s",
    ]
    width = max((len(n) for n in summary["fields_ms"]), default=0)
    for name, p in summary["fields_ms"].items():
        lines.append(f"  {name:<{width}}  {pair(p, ' ms')}")
    lines.extend(f"  error: {e}" for e in summary["errors"])
    return "\n".join(lines)


def ratios(served: dict[str, Any], local: dict[str, Any]) -> dict[str, float]:
    """Served / in-process for the headline figures (> 1 means the served figure is larger)."""

    def div(a: float, b: float) -> float:
        return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan

    out = {
        "generated_fps_per_session_p50": div(served["generated_fps_per_session"]["p50"], local["generated_fps_per_session"]["p50"]),
        "time_to_first_frame_p50": div(served["time_to_first_frame_s"]["p50"], local["time_to_first_frame_s"]["p50"]),
        "event_latency_p50": div(served["event_latency_ms"]["p50"], local["event_latency_ms"]["p50"]),
    }
    for name in ("chunk_total_ms", "scheduler_forward_ms"):
        if name in served["fields_ms"] and name in local["fields_ms"]:
            out[f"{name}_p50"] = div(served["fields_ms"][name]["p50"], local["fields_ms"][name]["p50"])
    return out


def plot(result: dict[str, Any], path: Path, title: str = "") -> None:
    """Chunk latency over time: ``chunk_total_ms`` per session, and the per-stage medians per chunk."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=False)
    for n, session in enumerate(result["sessions"]):
        if session.get("stats"):
            top.plot(session["stats_arrival_s"], [s["chunk_total_ms"] for s in session["stats"]], marker=".", lw=1, label=f"session {n}")
    top.set_xlabel("time since init (s)")
    top.set_ylabel("chunk_total_ms")
    top.set_title(title or "chunk latency over time")
    if len(result["sessions"]) <= 8:
        top.legend(fontsize=7)
    chunks = max((len(s.get("stats", [])) for s in result["sessions"]), default=0)
    for name in STAGE_FIELDS + ("scheduler_forward_ms",):
        medians = []
        for index in range(chunks):
            values = [s["stats"][index][name] for s in result["sessions"] if len(s.get("stats", [])) > index and name in s["stats"][index]]
            medians.append(statistics.median(values) if values else math.nan)
        if any(v and not math.isnan(v) for v in medians):
            bottom.plot(range(chunks), medians, marker=".", lw=1, label=name)
    bottom.set_xlabel("chunk index")
    bottom.set_ylabel("ms (median over sessions)")
    bottom.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _load_app_args(config: Path) -> dict[str, Any]:
    import yaml

    document = yaml.safe_load(config.read_text())
    return document["applications"][0].get("args", {})


def bench_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lingbot-ray bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="ws://127.0.0.1:8000", help="server (ws/http base or the full realtime URL)")
    parser.add_argument("--sessions", type=int, default=1)
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--chunks", type=int, default=12, help="chunks per session (max_chunks)")
    length.add_argument("--duration", type=float, default=None, help="seconds; sessions run until then instead")
    parser.add_argument("--format", default="raw", choices=["raw", "delta-gzip", "webp", "jpeg"])
    parser.add_argument("--size", default=None, help="WxH (default: the served model's)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--prompt", default=BenchSpec.prompt)
    parser.add_argument("--first-frame", type=Path, default=SAMPLE_FIRST_FRAME)
    parser.add_argument("--event-every", type=int, default=2, help="send a camera event every N chunks (0: none)")
    parser.add_argument("--warmup", type=int, default=2, help="chunks per session left out of the figures")
    parser.add_argument("--api-key", default=os.environ.get("LINGBOT_API_KEY"))
    parser.add_argument("--out", type=Path, default=None, help="JSON result file")
    parser.add_argument("--plot", type=Path, default=None, help="PNG plot of chunk latency over time")
    parser.add_argument("--vs-inprocess", action="store_true", help="also run the bench on the in-process app of --config and print ratios")
    parser.add_argument("--config", type=Path, default=Path("serve_config.yaml"), help="with --vs-inprocess: the serve config to build in process")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    for name in ("sessions", "chunks"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be ≥ 1, got {value}")
    spec = BenchSpec(
        url=args.url,
        sessions=args.sessions,
        chunks=None if args.duration else args.chunks,
        duration_s=args.duration,
        output_format=None if args.format == "delta-gzip" else args.format,
        size=args.size,
        seed=args.seed,
        prompt=args.prompt,
        first_frame=args.first_frame,
        event_every=args.event_every,
        warmup=args.warmup,
        api_key=args.api_key,
        progress=not args.no_progress,
    )
    result = run_bench(spec)
    print(format_summary(result["summary"], f"served ({spec.url})"))
    if args.vs_inprocess:
        from ..serve.local import serve_locally

        app_args = _load_app_args(args.config)
        with serve_locally(app_args) as server:
            local = run_bench(BenchSpec(**{**vars(spec), "url": server.url, "api_key": app_args.get("ingress", {}).get("api_key")}))
        print(format_summary(local["summary"], f"in-process ({args.config}, no Ray)"))
        result["in_process"] = local
        result["ratio_served_to_in_process"] = ratios(result["summary"], local["summary"])
        print("ratio served / in-process: " + ", ".join(f"{k} {v:.2f}" for k, v in result["ratio_served_to_in_process"].items()))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
        print(f"wrote {args.out}")
    if args.plot:
        plot(result, args.plot, f"{spec.sessions} session(s), {spec.output_format or 'delta-gzip'}, {spec.url}")
        print(f"wrote {args.plot}")
    return 0 if result["summary"]["failed"] == 0 else 1
