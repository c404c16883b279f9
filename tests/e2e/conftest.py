"""Fixtures of the e2e suite: one real single-node cluster per session (see node.py).

Missing binaries or tools fail the tests with the command that installs them; they are never skipped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.controlplane.cluster import Binaries, Cluster, ClusterError

from .node import NODE_IP, Node, host_network_up

log = logging.getLogger("kvmesh.e2e")


@pytest.fixture(scope="session")
def node() -> Iterator[Node]:
    start = time.monotonic()
    cluster = None
    try:
        binaries = Binaries()
        binaries.require()
        host_network_up()
        cluster = Cluster(binaries, host=NODE_IP).start()
        node = Node(cluster).start()
    except ClusterError as exc:
        if cluster is not None:
            cluster.stop()
        pytest.fail(str(exc), pytrace=False)
    print(f"\n[e2e] node ready in {time.monotonic() - start:.1f}s")
    try:
        yield node
    finally:
        node.stop()
        cluster.stop()


@contextmanager
def step(node: Node, name: str, namespace: str | None = None) -> Iterator[None]:
    """Times one step of the user's path; a failure carries what the cluster said."""
    start = time.monotonic()
    try:
        yield
    except Exception as exc:
        raise AssertionError(f"{name} failed: {exc}\n{node.diagnostics(namespace)}") from exc
    finally:
        print(f"\n[e2e] {name}: {time.monotonic() - start:.1f}s")
