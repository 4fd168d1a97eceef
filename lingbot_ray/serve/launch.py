"""``lingbot-ray config`` and ``lingbot-ray serve``: the packaged configs, and ``serve run`` with a
graceful stop.

``serve run CONFIG`` stops on Ctrl-C by calling ``serve.shutdown()``, and in Ray 2.60 the controller
kills the HTTP proxies in the same control-loop tick as it starts stopping the replicas (a proxy's
own shutdown is a no-op before ``ray.kill``): every WebSocket is cut without a close frame, and
no replica code runs in between. ``lingbot-ray serve CONFIG`` deploys the same file with Ray's own
``serve run --non-blocking`` and keeps the cluster; on SIGINT or SIGTERM it first asks every ingress
replica to end its sockets with close 1001 (``Ingress.shut_down_sessions``), then shuts Serve down
(docs/DEPLOYING.md, "Stopping").
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time

logger = logging.getLogger("lingbot_ray.serve")

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def packaged_configs() -> dict[str, pathlib.Path]:
    """The serve configs and manifests installed with the package, by name (file name less .yaml)."""
    return {path.stem: path for path in sorted(CONFIGS.glob("*.yaml"))}


def config_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lingbot-ray config", description="print a serve config installed with the package")
    parser.add_argument("name", nargs="?", help="the config's name; none: list them")
    parser.add_argument("--path", action="store_true", help="print the file's path instead of its text")
    args = parser.parse_args(argv)
    configs = packaged_configs()
    if args.name is None:
        for name, path in configs.items():
            first = next((line[2:].strip() for line in path.read_text().splitlines() if line.startswith("# ")), "")
            print(f"{name:40s} {first}")
        return 0
    if args.name not in configs:
        parser.error(f"name={args.name!r}: not a packaged config; one of {sorted(configs)}")
    print(configs[args.name] if args.path else configs[args.name].read_text(), end="\n" if args.path else "")
    return 0


def _ingress_apps(serve) -> list[str]:
    return [name for name, app in serve.status().applications.items() if "Ingress" in app.deployments]


def shut_down_sessions(serve, reason: str, timeout_s: float) -> int:
    """Tell every ingress replica of every application to end its sockets with 1001; returns how
    many sockets were ended. Calls go through the deployment's handle, which picks a replica at
    random, so each application is called until every running replica has answered."""
    ended = 0
    for app in _ingress_apps(serve):
        running = serve.status().applications[app].deployments["Ingress"].replica_states.get("RUNNING", 0)
        handle = serve.get_deployment_handle("Ingress", app_name=app)
        answered: set[str] = set()
        for _ in range(20 * max(1, running)):
            if len(answered) >= running:
                break
            result = handle.shut_down_sessions.remote(reason, timeout_s).result(timeout_s=timeout_s + 30)
            if result["replica_id"] not in answered:
                answered.add(result["replica_id"])
                ended += result["ended"]
        logger.info("%s: %d of %d ingress replica(s) closed their sockets", app, len(answered), running)
    return ended


def serve_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lingbot-ray serve",
        description="serve run CONFIG, and on SIGINT/SIGTERM end every session with close 1001 before Serve shuts down",
    )
    parser.add_argument("config", help="a serve config file (or the name of a packaged one: lingbot-ray config)")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="an existing Ray cluster (default: start one here)")
    parser.add_argument("--temp-dir", default=None, help="the local Ray cluster's temp dir (several clusters on one machine)")
    parser.add_argument("--grace-s", type=float, default=10.0, help="how long sockets get to close before Serve shuts down")
    args = parser.parse_args(argv)
    config = pathlib.Path(args.config)
    if not config.is_file():
        config = packaged_configs().get(args.config, config)
    if not config.is_file():
        parser.error(f"config={args.config!r}: no such file, and not a packaged config ({sorted(packaged_configs())})")

    import ray
    from ray import serve

    ray.init(address=args.address, namespace="serve", include_dashboard=False, _temp_dir=args.temp_dir, log_to_driver=False)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs handlers of its own
        signal.signal(signum, lambda *_: stop.set())
    gcs = ray.get_runtime_context().gcs_address
    # Ray's own `serve run`: the config file with all of Serve's options, deployed onto this cluster
    command = [shutil.which("serve") or "serve", "run", "--non-blocking", "--address", gcs, str(config)]
    logger.info("deploying %s: %s", config, " ".join(command))
    deployed = subprocess.run(command, check=False)
    if deployed.returncode != 0:
        logger.error("serve run failed (exit %d)", deployed.returncode)
        ray.shutdown()
        return deployed.returncode
    logger.info("deployed; SIGINT or SIGTERM ends every session with close 1001, then stops Serve")
    while not stop.wait(1.0):
        pass
    started = time.monotonic()
    try:
        ended = shut_down_sessions(serve, "the service is stopping", args.grace_s)
        logger.info("%d session(s) ended with close 1001 in %.1f s; shutting Serve down", ended, time.monotonic() - started)
    except Exception as exc:  # a broken application must not keep the cluster up
        logger.error("could not end the sessions gracefully (%r); shutting Serve down", exc)
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(serve_main(sys.argv[1:]))
