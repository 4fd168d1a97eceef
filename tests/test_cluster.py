"""The test clusters' helper (tests/cluster.py): a cluster whose Serve fails to start is shut down,
so that the next module's ``ray.init`` is not refused."""

import os

import pytest

from tests.cluster import serve_cluster

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402


def test_a_cluster_whose_serve_fails_to_start_leaves_ray_shut_down(monkeypatch):
    def proxy_never_came_up(**_):
        raise TimeoutError("the Serve proxy did not start in time")

    monkeypatch.setattr(serve, "start", proxy_never_came_up)
    with pytest.raises(TimeoutError, match="proxy"):
        with serve_cluster("lt", num_cpus=1) as cluster:
            pytest.fail(f"the block ran on a cluster without Serve ({cluster})")
    assert not ray.is_initialized()  # so the next module's ray.init is not refused


def test_a_failure_inside_the_block_shuts_the_cluster_down_and_removes_its_dir():
    with pytest.raises(RuntimeError, match="deploy failed"):
        with serve_cluster("lt", num_cpus=1) as cluster:
            assert ray.is_initialized() and os.path.isdir(cluster.root)
            raise RuntimeError("deploy failed")
    assert not ray.is_initialized()
    assert not os.path.exists(cluster.root)

