"""A test module's own Ray cluster with Serve, and free loopback ports.

Several clusters may run on one machine, so each one gets its own temp dir and free ports, and none
is ever stopped by name. The cluster is shut down however its ``with`` block ends: a cluster that
fails to start (a Serve proxy that does not come up in time on a busy machine) or an app that fails
to deploy must not leave Ray initialised in the test process, or every later module's ``ray.init``
fails too and one failure reads as thirty.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass


def free_port() -> int:
    """A loopback port that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Cluster:
    root: str  # a temp dir removed afterwards: the cluster's files, and the test's
    port: int  # Serve's HTTP port on 127.0.0.1
    metrics_port: int | None  # Ray's Prometheus export port, when asked for


@contextlib.contextmanager
def serve_cluster(prefix: str, *, num_cpus: int | None = None, metrics: bool = False) -> Iterator[Cluster]:
    """``ray.init`` and ``serve.start`` in a fresh temp dir (``prefix``: keep it short, Ray's socket
    paths must stay under 107 bytes); Serve and Ray shut down, and the dir removed, on the way out."""
    import ray
    from ray import serve

    root = tempfile.mkdtemp(prefix=prefix)
    cluster = Cluster(root=root, port=free_port(), metrics_port=free_port() if metrics else None)
    extra = {} if cluster.metrics_port is None else {"_metrics_export_port": cluster.metrics_port}
    try:
        ray.init(num_cpus=num_cpus, include_dashboard=False, _temp_dir=os.path.join(root, "ray"), log_to_driver=False, **extra)
        serve.start(http_options={"host": "127.0.0.1", "port": cluster.port})
        yield cluster
    finally:
        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(root, ignore_errors=True)
