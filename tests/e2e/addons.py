"""Cluster add-ons of the e2e node: CoreDNS (the `kube-dns` Service) and the sandbox image's name."""

from __future__ import annotations

from tests.controlplane.cluster import Cluster, read_versions

PAUSE_IMAGE = "kvmesh.local/pause:1"
DNS_IP = "10.0.0.10"
DNS_PORT = 1053  # inside the pod: CoreDNS runs unprivileged, so it cannot bind 53

COREFILE = f""".:{DNS_PORT} {{
    errors
    health :8080
    ready :8181
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    forward . /etc/resolv.conf
    cache 30
    loadbalance
}}
"""


def coredns_manifests(image: str) -> list[dict]:
    ns, labels = "kube-system", {"k8s-app": "kube-dns"}
    meta = {"name": "coredns", "namespace": ns}
    rules = [
        {"apiGroups": [""], "resources": ["services", "pods", "namespaces"], "verbs": ["list", "watch"]},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
    ]
    container = {
        "name": "coredns",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "args": ["-conf", "/etc/coredns/Corefile"],
        "ports": [
            {"containerPort": DNS_PORT, "protocol": p, "name": f"dns-{p.lower()}"} for p in ("UDP", "TCP")
        ],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181}, "periodSeconds": 2},
        "livenessProbe": {"httpGet": {"path": "/health", "port": 8080}, "periodSeconds": 10},
        "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns", "readOnly": True}],
        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}},
        "securityContext": {
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    pod = {
        "metadata": {"labels": labels},
        "spec": {
            "serviceAccountName": "coredns",
            "dnsPolicy": "Default",  # upstream is the host's resolver, not itself
            "priorityClassName": "system-cluster-critical",
            "containers": [container],
            "volumes": [{"name": "config", "configMap": {"name": "coredns"}}],
        },
    }
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "system:coredns"},
            "rules": rules,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "system:coredns"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "system:coredns",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "coredns", "namespace": ns}],
        },
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"Corefile": COREFILE}},
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta,
            "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": pod},
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "kube-dns", "namespace": ns, "labels": labels},
            "spec": {
                "clusterIP": DNS_IP,
                "selector": labels,
                "ports": [
                    {"name": f"dns-{p.lower()}", "port": 53, "targetPort": DNS_PORT, "protocol": p}
                    for p in ("UDP", "TCP")
                ],
            },
        },
    ]


def install_coredns(cluster: Cluster, timeout: float) -> None:
    image = f"kvmesh.local/coredns:{read_versions()['COREDNS_VERSION']}"
    cluster.apply(coredns_manifests(image))
    cluster.kubectl(
        "rollout",
        "status",
        "deployment/coredns",
        "-n",
        "kube-system",
        f"--timeout={int(timeout)}s",
        timeout=timeout + 10,
    )
