"""``lingbot-ray record``: run a session and write its stream to MP4 (PyAV) or PNG frames, stats beside.

The session is steered by a script of actions or by keys typed live in the terminal:

* ``--actions "w*6,l*3,_*3"``: the init's camera script, one entry per latent frame (``_`` = no key,
  ``+`` joins held keys, ``*N`` repeats);
* ``--script FILE.json``: ``{"prompt"?, "actions"?: "w*6,..." or [[...], ...], "events"?: [{"at_chunk": N,
  "kind": "prompt" | "camera_actions" | "composite_input", "payload": ...}, ...]}``; an event is sent
  when chunk ``at_chunk - 1``'s stats arrive;
* ``--live``: W/A/S/D move, I/J/K/L look, space releases every key, Q stops. A terminal reports key
  presses and auto-repeats but no releases, so a key counts as held while it repeats and is released
  ``--release-after`` seconds after its last repeat; every change of the held set is sent as a camera
  state transition.

Output: ``OUT.mp4`` (H.264, yuv420p, at the stream's fps) or, for any other ``OUT``, a folder of
``frame_00000.png`` …; the ``chunk_stats`` go to ``OUT.stats.jsonl`` (MP4) or ``OUT/stats.jsonl``.

    lingbot-ray record walk.mp4 --actions "w*12,l*6,w*6" --chunks 8
    lingbot-ray record frames/ --live --format delta-gzip
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..protocol.actions import ACTIONS
from ..transport.mp4 import Mp4Writer
from .consistency import SAMPLE_FIRST_FRAME
from .session import (
    ScheduledEvent,
    SessionResult,
    make_init,
    parse_actions,
    run_session,
    ws_url,
)


# ------------------------------------------------------------------------------------- writers


class PngWriter:
    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.frames = folder, 0

    def write(self, frames: np.ndarray, fps: float) -> None:
        for frame in frames:
            Image.fromarray(frame).save(self.folder / f"frame_{self.frames:05d}.png")
            self.frames += 1

    def close(self) -> None:
        pass


def open_output(out: Path) -> tuple[Mp4Writer | PngWriter, Path]:
    """The frame writer for ``out`` and where the stats go."""
    if out.suffix.lower() == ".mp4":
        out.parent.mkdir(parents=True, exist_ok=True)
        return Mp4Writer(out), out.with_suffix(".stats.jsonl")
    writer = PngWriter(out)
    return writer, out / "stats.jsonl"


# ---------------------------------------------------------------------------------- live keys


class KeyHolds:
    """Held keys from a terminal's press-and-repeat stream (no releases): a key is held until
    ``release_after_s`` passes without a repeat. Returns the new held set on every change."""

    def __init__(self, release_after_s: float = 0.6) -> None:
        self.release_after_s = release_after_s
        self._last_seen: dict[str, float] = {}

    @property
    def held(self) -> list[str]:
        return sorted(self._last_seen)

    def press(self, key: str, now: float) -> list[str] | None:
        if key == " ":
            changed = bool(self._last_seen)
            self._last_seen.clear()
            return [] if changed else None
        if key not in ACTIONS:
            return None
        new = key not in self._last_seen
        self._last_seen[key] = now
        return self.held if new else None

    def expire(self, now: float) -> list[str] | None:
        gone = [k for k, seen in self._last_seen.items() if now - seen > self.release_after_s]
        for key in gone:
            del self._last_seen[key]
        return self.held if gone else None


def state_event(actions: list[str]) -> dict[str, Any]:
    transition = {"actions": actions, "client_ts_ms": int(time.time() * 1000)}
    return {"type": "event", "kind": "camera_actions", "payload": {"mode": "state", "transitions": [transition]}}


@contextlib.contextmanager
def cbreak(fd: int) -> Iterator[None]:
    """Characters arrive one by one without echo while inside (a no-op when ``fd`` is no terminal)."""
    if not os.isatty(fd):
        yield
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def pump_keys(fd: int, queue: asyncio.Queue, stop: asyncio.Event, holds: KeyHolds) -> None:
    """Read keys from ``fd`` and put camera state events on ``queue`` until Q, EOF or ``stop``."""
    loop = asyncio.get_running_loop()
    keys: asyncio.Queue[str] = asyncio.Queue()

    def readable() -> None:
        data = os.read(fd, 64)
        for char in data.decode(errors="ignore") if data else "q":
            keys.put_nowait(char.lower())

    loop.add_reader(fd, readable)
    try:
        while not stop.is_set():
            try:
                char = await asyncio.wait_for(keys.get(), 0.1)
            except asyncio.TimeoutError:
                char = None
            now = time.monotonic()
            if char == "q":
                stop.set()
                break
            change = holds.press(char, now) if char else None
            change = holds.expire(now) if change is None else change
            if change is not None:
                await queue.put(state_event(change))
                print(f"\rheld: {' '.join(change) or '-':<12}", end="", file=sys.stderr, flush=True)
    finally:
        loop.remove_reader(fd)
        await queue.put(None)


# ------------------------------------------------------------------------------------- record


def load_script(path: Path) -> dict[str, Any]:
    script = json.loads(path.read_text())
    if not isinstance(script, dict):
        raise ValueError(f"{path}: a script is a JSON object, got {type(script).__name__}")
    unknown = set(script) - {"prompt", "actions", "events"}
    if unknown:
        raise ValueError(f"{path}: unknown script keys {sorted(unknown)} (known: prompt, actions, events)")
    actions = script.get("actions")
    if isinstance(actions, str):
        script["actions"] = parse_actions(actions)
    events = []
    for n, event in enumerate(script.get("events", [])):
        if not isinstance(event, dict) or not isinstance(event.get("at_chunk"), int) or event["at_chunk"] < 0:
            raise ValueError(f"{path}: events[{n}] needs an integer at_chunk ≥ 0, got {event!r}")
        message = {k: v for k, v in event.items() if k != "at_chunk"}
        message.setdefault("type", "event")
        events.append(ScheduledEvent(event["at_chunk"], message))
    script["events"] = events
    return script


async def record(
    url: str,
    init: dict[str, Any],
    out: Path,
    *,
    events: list[ScheduledEvent] = (),
    live_fd: int | None = None,
    release_after_s: float = 0.6,
    api_key: str | None = None,
) -> tuple[SessionResult, int, Path]:
    """Run the session, writing frames to ``out`` and stats beside; returns (result, frames, stats path)."""
    writer, stats_path = open_output(out)
    default_fps = float(init.get("fps", 16))
    live_queue = stop = keys_task = None
    with open(stats_path, "w") as stats_file, (cbreak(live_fd) if live_fd is not None else contextlib.nullcontext()):
        if live_fd is not None:
            live_queue, stop = asyncio.Queue(), asyncio.Event()
            keys_task = asyncio.create_task(pump_keys(live_fd, live_queue, stop, KeyHolds(release_after_s)))
        try:
            result = await run_session(
                url,
                init,
                events=events,
                live=live_queue,
                stop=stop,
                on_frames=lambda batch, frames: writer.write(frames, float(batch.get("fps") or default_fps)),
                # flushed per chunk: the file is also how a watcher follows a live recording
                on_stats=lambda stats: (stats_file.write(json.dumps(stats) + "\n"), stats_file.flush()),
                api_key=api_key,
            )
        finally:
            writer.close()
            if keys_task is not None:
                stop.set()
                await keys_task
    return result, writer.frames, stats_path


def record_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lingbot-ray record", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="OUT.mp4, or a folder for PNG frames")
    parser.add_argument("--url", default="ws://127.0.0.1:8000", help="server (ws/http base or the full realtime URL)")
    steer = parser.add_mutually_exclusive_group()
    steer.add_argument("--actions", default=None, help='camera script, e.g. "w*6,l*3,_*3"')
    steer.add_argument("--script", type=Path, default=None, help="JSON script with actions and timed events")
    steer.add_argument("--live", action="store_true", help="steer with keys typed in this terminal (Q stops)")
    parser.add_argument("--chunks", type=int, default=None, help="max_chunks (default: 8, or until Q with --live)")
    parser.add_argument("--prompt", default="a walk through a procedural world")
    parser.add_argument("--first-frame", type=Path, default=SAMPLE_FIRST_FRAME)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--size", default=None, help="WxH (default: the served model's)")
    parser.add_argument("--format", default="raw", choices=["raw", "delta-gzip", "webp", "jpeg"], help="transport (raw and delta-gzip are lossless)")
    parser.add_argument("--release-after", type=float, default=0.6, help="with --live: seconds without a key repeat that release it")
    parser.add_argument("--api-key", default=os.environ.get("LINGBOT_API_KEY"))
    args = parser.parse_args(argv)
    script = load_script(args.script) if args.script else {"events": []}
    actions = parse_actions(args.actions) if args.actions else script.get("actions")
    chunks = args.chunks if args.chunks is not None else (None if args.live else 8)
    if chunks is not None and chunks < 1:
        parser.error(f"--chunks must be ≥ 1, got {chunks}")
    init = make_init(
        script.get("prompt", args.prompt),
        args.first_frame.read_bytes(),
        seed=args.seed,
        max_chunks=chunks,
        output_format=None if args.format == "delta-gzip" else args.format,
        size=args.size,
        actions=actions,
    )
    if args.live:
        print("keys: W/A/S/D move, I/J/K/L look, space releases, Q stops", file=sys.stderr)
    result, frames, stats_path = asyncio.run(
        record(ws_url(args.url), init, args.out, events=script["events"], live_fd=sys.stdin.fileno() if args.live else None,
               release_after_s=args.release_after, api_key=args.api_key)
    )
    print(f"\nwrote {frames} frames to {args.out} and {len(result.stats)} chunk stats to {stats_path}; "
          f"close {result.close_code} {result.close_reason!r}" + (f", errors {result.errors}" if result.errors else ""))
    return 0 if not result.errors and result.close_code in (1000, None) else 1
