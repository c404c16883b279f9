"""Leader election over a ``coordination.k8s.io/v1`` Lease, as client-go's leaderelection does it.

Every operator replica runs :meth:`LeaderElector.acquire` before it starts reconciling; one holds
the Lease and renews it, the others wait until it expires. A leader that cannot renew within the
lease duration stops (and restarts as a standby), so two replicas never reconcile at once for
longer than one renew period. Updates carry the Lease's resourceVersion: the API server rejects a
write based on a stale read (409), which is what makes a takeover race-free.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections.abc import Callable

from kvmesh.operator.kube import Kube, KubeError, Manifest

log = logging.getLogger("kvmesh.operator")


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _micro(t: datetime.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(value: str | None) -> datetime.datetime | None:
    if not value:
        return None
    return datetime.datetime.strptime(value.replace("Z", "+0000"), "%Y-%m-%dT%H:%M:%S.%f%z")


class LeaderElector:
    def __init__(
        self,
        kube: Kube,
        namespace: str,
        name: str,
        identity: str,
        lease_seconds: int = 15,
        renew_seconds: float = 5.0,
    ) -> None:
        self.kube = kube
        self.path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
        self.name = name
        self.identity = identity
        self.lease_seconds = lease_seconds
        self.renew_seconds = renew_seconds

    def try_acquire_or_renew(self) -> bool:
        """One attempt: True when this replica holds the Lease afterwards."""
        now = _now()
        try:
            lease = self.kube.request("GET", f"{self.path}/{self.name}")
            if lease is None:
                self.kube.request("POST", self.path, body=self._lease(None, now, transitions=0))
                return True
            spec = lease.get("spec") or {}
            holder = spec.get("holderIdentity") or ""
            renewed = _parse(spec.get("renewTime"))
            duration = int(spec.get("leaseDurationSeconds") or self.lease_seconds)
            expired = renewed is None or (now - renewed).total_seconds() > duration
            if holder not in ("", self.identity) and not expired:
                return False
            transitions = int(spec.get("leaseTransitions") or 0) + (holder != self.identity)
            acquired = spec.get("acquireTime") if holder == self.identity else None
            body = self._lease(lease["metadata"]["resourceVersion"], now, transitions, acquired)
            self.kube.request("PUT", f"{self.path}/{self.name}", body=body)
            return True
        except KubeError as exc:
            if exc.status != 409:  # 409: another replica wrote first; not an error
                log.warning("Lease update failed", extra={"lease": self.name, "error": str(exc)})
            return False

    def _lease(
        self, version: str | None, now: datetime.datetime, transitions: int, acquired: str | None = None
    ) -> Manifest:
        metadata: Manifest = {"name": self.name}
        if version is not None:
            metadata["resourceVersion"] = version
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": metadata,
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": self.lease_seconds,
                "acquireTime": acquired or _micro(now),
                "renewTime": _micro(now),
                "leaseTransitions": transitions,
            },
        }

    def acquire(self, stop: threading.Event) -> bool:
        """Blocks until this replica leads (True) or ``stop`` is set (False)."""
        announced = False
        while not stop.is_set():
            if self.try_acquire_or_renew():
                log.info("Acquired the operator Lease", extra={"lease": self.name, "identity": self.identity})
                return True
            if not announced:
                log.info("Waiting for the operator Lease", extra={"lease": self.name})
                announced = True
            stop.wait(self.renew_seconds)
        return False

    def keep(self, stop: threading.Event, on_lost: Callable[[], None]) -> threading.Thread:
        """Renews in a daemon thread; calls ``on_lost`` when renewals fail for a lease duration."""

        def renew() -> None:
            last = time.monotonic()
            while not stop.wait(self.renew_seconds):
                if self.try_acquire_or_renew():
                    last = time.monotonic()
                elif time.monotonic() - last > self.lease_seconds:
                    log.error("Lost the operator Lease; stopping", extra={"lease": self.name})
                    on_lost()
                    return

        thread = threading.Thread(target=renew, name="lease-renewer", daemon=True)
        thread.start()
        return thread

    def release(self) -> None:
        """Gives the Lease up at shutdown, so a standby takes over at once instead of after expiry."""
        try:
            lease = self.kube.request("GET", f"{self.path}/{self.name}")
            if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            lease["spec"]["holderIdentity"] = ""
            lease["spec"]["renewTime"] = None
            self.kube.request("PUT", f"{self.path}/{self.name}", body=lease)
        except KubeError as exc:
            log.warning("Releasing the operator Lease failed", extra={"error": str(exc)})
