"""Helpers for tests that start Ray clusters of simulated nodes on this machine (ray.cluster_utils.Cluster)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Ports the operating system picks, for what Ray would otherwise bind at fixed defaults on every node (the
# dashboard agent's HTTP server, which serves the job API, at 52365): another Ray instance on this machine holds them.
OWN_PORTS = {"dashboard_agent_listen_port": 0}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def simulated_cluster(head: dict, nodes: list[dict] = ()) -> Iterator:
    """A head and worker nodes, each a set of Ray processes with its own resources: yields the cluster and the
    worker nodes in the order given.

    The cluster keeps its files (and its address file, which a bare `ray.init()` would look up) in a temporary
    directory of its own and binds no fixed port, so that it never meets another Ray instance on this machine. Its
    processes inherit this environment: the venv's `python` first on PATH, and the project importable.
    """
    from ray.cluster_utils import Cluster

    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_TMPDIR", temp_dir)
        env.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        env.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        cluster = Cluster(initialize_head=True, head_node_args={**OWN_PORTS, **head})
        try:
            added = [cluster.add_node(**OWN_PORTS, **node) for node in nodes]
            cluster.wait_for_nodes()
            yield cluster, added
        finally:
            cluster.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)


def study(*args, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m scaling_lab.study ...` in a fresh process."""
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "scaling_lab.study", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def wait_until(predicate, timeout_s: float, every_s: float = 0.5):
    """The first truthy value of predicate(), polled until timeout_s; None if there was none."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    return None
