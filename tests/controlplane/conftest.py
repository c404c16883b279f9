"""The `kube` fixture: one real control plane (etcd, kube-apiserver, kube-controller-manager) per session.

See tests/controlplane/cluster.py for what it runs and what the `Cluster` object offers. Missing binaries
fail the tests that use it with the command that builds them; they are never skipped.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .cluster import Binaries, Cluster, ClusterError


@pytest.fixture(scope="session")
def kube() -> Iterator[Cluster]:
    try:
        binaries = Binaries()
        binaries.require()
        cluster = Cluster(binaries).start()
    except ClusterError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()
