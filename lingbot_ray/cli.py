"""``lingbot-ray`` console command: one entry, a subcommand per tool."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand -> (module, function taking argv, one-line help); imported lazily so that a light
# command never pays for torch or ray.
_COMMANDS = {
    "build-tiny": ("lingbot_ray.models.tiny", "build_tiny_main", "write a random-weights tiny checkpoint folder (tests, smoke runs)"),
    "check": ("lingbot_ray.client.consistency", "check_main", "consistency and latency check against a server"),
    "bench": ("lingbot_ray.client.bench", "bench_main", "concurrent sessions against a server: latency, fps, bytes"),
    "record": ("lingbot_ray.client.record", "record_main", "run a session and write it to MP4 or PNG frames"),
    "config": ("lingbot_ray.serve.launch", "config_main", "list the serve configs installed with the package, or print one"),
    "serve": ("lingbot_ray.serve.launch", "serve_main", "serve run CONFIG, ending every session with close 1001 on SIGINT/SIGTERM"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="lingbot-ray", description=__doc__)
    parser.add_argument("command", choices=sorted(_COMMANDS), help="; ".join(f"{k}: {v[2]}" for k, v in _COMMANDS.items()))
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    args = parser.parse_args(argv[:1])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    module, func, _ = _COMMANDS[args.command]
    result = getattr(importlib.import_module(module), func)(argv[1:])
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
