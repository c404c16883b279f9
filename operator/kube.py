"""A small Kubernetes API client for the operator: server-side apply, get and scale, as plain dicts.

Built on the ``kubernetes`` package's authenticated REST client (kubeconfig or in-cluster), so the
operator needs no generated models and no API discovery.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from kvmesh.operator import crd

FIELD_MANAGER = "kvmesh-operator"
TIMEOUT_S = 30

Manifest = dict[str, Any]

# kind -> plural, for the kinds the operator writes or reads.
PLURALS = {
    "ConfigMap": "configmaps",
    "Service": "services",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "Deployment": "deployments",
    "Event": "events",
    crd.KIND: crd.PLURAL,
}


class KubeError(RuntimeError):
    """An API call failed; ``status`` is the HTTP status (0 when no response came)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def resource_path(api_version: str, kind: str, namespace: str, name: str | None = None) -> str:
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    path = f"{base}/namespaces/{namespace}/{PLURALS[kind]}"
    return f"{path}/{name}" if name else path


class Kube:
    def __init__(self, api_client: client.ApiClient) -> None:
        self.api = api_client

    @classmethod
    def connect(cls, kubeconfig: str | None = None) -> Kube:
        """In-cluster credentials when running in a pod, else the kubeconfig (``$KUBECONFIG``)."""
        configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        return cls(client.ApiClient(configuration))

    def request(
        self,
        method: str,
        path: str,
        *,
        query: list[tuple[str, str]] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> Manifest | None:
        """One API call; the decoded JSON answer, None for 404 on GET, KubeError otherwise."""
        headers = {"Accept": "application/json", "Content-Type": content_type}
        method, url, headers, body, _ = self.api.param_serialize(
            method,
            path,
            query_params=query or [],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            response = self.api.call_api(
                method, url, header_params=headers, body=body, _request_timeout=TIMEOUT_S
            )
            response.read()
        except ApiException as exc:
            raise KubeError(f"{method} {path}: {exc.reason}", exc.status or 0) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise KubeError(f"{method} {path}: {exc}") from exc
        if response.status == 404 and method == "GET":
            return None
        if not 200 <= response.status < 300:
            raise KubeError(f"{method} {path}: {response.status} {_message(response.data)}", response.status)
        return json.loads(response.data) if response.data else None

    def apply(self, manifest: Manifest, field_manager: str = FIELD_MANAGER) -> Manifest:
        """Server-side apply: create or converge the fields this manager owns (conflicts are taken over)."""
        meta = manifest["metadata"]
        path = resource_path(manifest["apiVersion"], manifest["kind"], meta["namespace"], meta["name"])
        query = [("fieldManager", field_manager), ("force", "true")]
        result = self.request(
            "PATCH", path, query=query, body=manifest, content_type="application/apply-patch+yaml"
        )
        assert result is not None
        return result

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> Manifest | None:
        return self.request("GET", resource_path(api_version, kind, namespace, name))

    def scale(self, namespace: str, name: str, replicas: int) -> None:
        """Set an InferenceDeployment's spec.replicas through its scale subresource (as an HPA does)."""
        path = resource_path(crd.API_VERSION, crd.KIND, namespace, name) + "/scale"
        body = {"spec": {"replicas": replicas}}
        self.request("PATCH", path, body=body, content_type="application/merge-patch+json")

    def patch_status(self, namespace: str, name: str, status: Manifest) -> None:
        """Merge-patch an InferenceDeployment's status subresource."""
        path = resource_path(crd.API_VERSION, crd.KIND, namespace, name) + "/status"
        body = {"status": status}
        self.request("PATCH", path, body=body, content_type="application/merge-patch+json")

    def post_event(self, involved: Manifest, type_: str, reason: str, message: str) -> None:
        """A core/v1 Event about an InferenceDeployment (``involved``: its metadata)."""
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        namespace = involved["namespace"]
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{involved['name']}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": crd.API_VERSION,
                "kind": crd.KIND,
                "name": involved["name"],
                "namespace": namespace,
                "uid": involved.get("uid", ""),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": FIELD_MANAGER},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        self.request("POST", resource_path("v1", "Event", namespace), body=event)


def _message(data: bytes | None) -> str:
    try:
        return json.loads(data or b"{}").get("message", "")
    except ValueError:
        return (data or b"").decode(errors="replace")[:200]
