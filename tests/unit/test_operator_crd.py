"""The InferenceDeployment CRD: generated from Python, defaults applied once, typed spec parsing."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kvmesh.operator import crd
from kvmesh.operator.spec import DeploymentSpec

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "kvmesh"
CRD_FILE = CHART / "files" / "crds" / "inferencedeployments.kvmesh.io.yaml"


def spec(**overrides: object) -> dict:
    out: dict = {"model": {"source": "hf://HuggingFaceTB/SmolLM2-135M-Instruct"}}
    out.update(overrides)
    return out


def test_chart_crd_is_generated_from_the_python_schema() -> None:
    on_disk = yaml.safe_load(CRD_FILE.read_text())
    assert on_disk == crd.crd_manifest(), (
        "stale CRD: run `python -m kvmesh.operator.crd > " + str(CRD_FILE.relative_to(REPO)) + "`"
    )


def test_crd_is_a_template_so_helm_upgrade_upgrades_it() -> None:
    """Helm installs crds/ once and never upgrades it; the chart renders the CRD from a template."""
    assert not (CHART / "crds").exists()
    template = (CHART / "templates" / "crds.yaml").read_text()
    assert '.Files.Get "files/crds/inferencedeployments.kvmesh.io.yaml"' in template
    # Uninstalling the chart must not take every InferenceDeployment with it.
    assert crd.crd_manifest()["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}


def test_crd_has_scale_and_status_subresources_and_printer_columns() -> None:
    version = crd.crd_manifest()["spec"]["versions"][0]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    columns = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert columns == ["Model", "Ready", "Desired", "Age"]


def test_defaults_fill_nested_objects_like_the_api_server() -> None:
    out = crd.apply_defaults(spec())
    assert out["replicas"] == 1
    assert out["engine"] == {
        "dtype": "auto",
        "blockSize": 16,
        "maxNumSeqs": 256,
        "maxModelLen": 4096,
        "gpuMemoryUtilization": 0.9,
        "tensorParallelSize": 1,
        "speculative": {
            "method": "none",
            "numSpeculativeTokens": 4,
            "ngramMin": 2,
            "ngramMax": 4,
            "disableBatchSize": 32,
        },
        "extraArgs": [],
    }
    assert out["autoscaling"]["target"] == {"metric": "queueDepth", "value": 8.0}
    assert out["autoscaling"]["scaleDown"] == {"stabilizationWindowSeconds": 300}
    assert out["routing"] == {"policy": "prefix", "loadFactor": 1.25}
    assert out["rollout"] == {"maxSurge": 1, "maxUnavailable": 0, "startupTimeoutSeconds": 3600}
    assert out["cache"] == {"sizeLimit": "20Gi"}
    assert out["resources"]["shmSize"] == "1Gi"


def test_defaults_keep_given_values_and_do_not_mutate_input() -> None:
    given = spec(engine={"blockSize": 32}, replicas=3)
    out = crd.apply_defaults(given)
    assert out["engine"]["blockSize"] == 32 and out["engine"]["maxNumSeqs"] == 256
    assert out["replicas"] == 3
    assert given == spec(engine={"blockSize": 32}, replicas=3)


def test_the_typed_spec_is_parsed_once_with_every_default() -> None:
    s = DeploymentSpec.parse(spec(resources={"gpus": 1, "gpuResourceName": "nvidia.com/mig-1g.10gb"}))
    assert s.replicas == 1 and s.engine.block_size == 16 and s.routing.load_factor == 1.25
    assert s.autoscaling.min_replicas == 1 and s.autoscaling.max_replicas == 4
    assert s.autoscaling.scale_down_window == 300 and s.autoscaling_enabled is False
    assert s.rollout.startup_timeout_s == 3600 and s.cache.claim_name is None
    # MIG slices are scheduled on nodes tainted nvidia.com/gpu, not with their resource name.
    assert s.resources.gpu_taint_key == "nvidia.com/gpu"
    assert DeploymentSpec.parse(
        spec(resources={"gpuResourceName": "amd.com/gpu"})
    ).resources.gpu_taint_key == ("amd.com/gpu")


def _rules(schema: dict) -> dict[str, str]:
    return {r["message"]: r["rule"] for r in schema.get("x-kubernetes-validations", [])}


def test_cel_rules_refuse_what_the_worker_cannot_run() -> None:
    schema = crd.spec_schema()
    assert not _rules(schema["properties"]["engine"])  # tensorParallelSize > 1 is allowed
    spec_rules = _rules(schema)
    assert any("resources.gpus must equal engine.tensorParallelSize" in m for m in spec_rules)
    autoscaling = schema["properties"]["autoscaling"]
    assert "self.minReplicas <= self.maxReplicas" in autoscaling["x-kubernetes-validations"][0]["rule"]
    assert schema["required"] == ["model"]
    redis_rules = _rules(schema["properties"]["redis"])
    assert any("redis.url must not carry credentials" in m for m in redis_rules)
    # The tokenizer field reached no program: it is gone rather than silently ignored.
    assert "tokenizer" not in schema["properties"]["model"]["properties"]
    assert "blockSize" not in schema["properties"]["routing"]["properties"]


@pytest.mark.parametrize("path", sorted((REPO / "deploy" / "samples").glob("*.yaml")), ids=lambda p: p.name)
def test_samples_parse_into_a_typed_spec(path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        assert doc["apiVersion"] == crd.API_VERSION and doc["kind"] == crd.KIND
        parsed = DeploymentSpec.parse(doc["spec"])
        assert parsed.engine.tensor_parallel_size == 1
        assert parsed.resources.gpus in (0, parsed.engine.tensor_parallel_size)


def test_the_manifest_is_a_copy_callers_may_edit() -> None:
    manifest = crd.crd_manifest()
    del manifest["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][
        "rollout"
    ]
    assert "rollout" in crd.apply_defaults(spec())
    assert (
        "rollout"
        in crd.crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
            "properties"
        ]
    )
