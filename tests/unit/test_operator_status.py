"""KEP-1623 status conditions of an InferenceDeployment from its worker Deployment's state (pure)."""

from __future__ import annotations

from kvmesh.operator import status


def deployment_state(generation: int = 1, observed: int = 1, **fields: int) -> dict:
    return {"metadata": {"generation": generation}, "status": {"observedGeneration": observed, **fields}}


def conditions(result: dict) -> dict:
    return {c["type"]: c for c in result["conditions"]}


def test_status_all_ready() -> None:
    dep = deployment_state(replicas=2, updatedReplicas=2, readyReplicas=2, availableReplicas=2)
    got = status.compute_status(
        generation=3, desired=2, selector="s", endpoint="e", deployment=dep, previous=None, now="T1"
    )
    c = conditions(got)
    assert (c["Ready"]["status"], c["Ready"]["reason"]) == ("True", "AllReplicasReady")
    assert (c["Progressing"]["status"], c["Progressing"]["reason"]) == ("False", "Complete")
    assert (c["Degraded"]["status"], c["Degraded"]["reason"]) == ("False", "AsExpected")
    assert got["observedGeneration"] == 3 and got["readyReplicas"] == 2 and got["selector"] == "s"
    assert all(x["observedGeneration"] == 3 for x in got["conditions"])


def test_status_rolling_out_and_not_ready() -> None:
    dep = deployment_state(generation=2, observed=1, replicas=1)
    c = conditions(
        status.compute_status(
            generation=1, desired=1, selector="", endpoint="", deployment=dep, previous=None
        )
    )
    assert (c["Progressing"]["status"], c["Progressing"]["reason"]) == ("True", "RollingOut")
    assert (c["Ready"]["status"], c["Ready"]["reason"]) == ("False", "NoReplicasReady")


def test_status_degraded_on_progress_deadline() -> None:
    dep = deployment_state(replicas=1, updatedReplicas=1)
    dep["status"]["conditions"] = [
        {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "slow"}
    ]
    c = conditions(
        status.compute_status(
            generation=1, desired=1, selector="", endpoint="", deployment=dep, previous=None
        )
    )
    assert (c["Degraded"]["status"], c["Degraded"]["reason"]) == ("True", "ProgressDeadlineExceeded")
    assert c["Progressing"]["status"] == "False"


def test_apply_failure_keeps_observed_generation() -> None:
    got = status.compute_status(
        generation=5,
        desired=1,
        selector="",
        endpoint="",
        deployment=None,
        previous={"observedGeneration": 4},
        apply_error="forbidden",
    )
    assert got["observedGeneration"] == 4
    assert conditions(got)["Degraded"]["reason"] == "ApplyFailed"


def test_last_transition_time_changes_only_when_status_flips() -> None:
    not_ready = deployment_state(replicas=1, updatedReplicas=1)
    ready = deployment_state(replicas=1, updatedReplicas=1, readyReplicas=1, availableReplicas=1)
    kw = {"generation": 1, "desired": 1, "selector": "", "endpoint": ""}
    first = status.compute_status(**kw, deployment=not_ready, previous=None, now="T1")
    same = status.compute_status(**kw, deployment=not_ready, previous=first, now="T2")
    assert conditions(same)["Ready"]["lastTransitionTime"] == "T1"
    flipped = status.compute_status(**kw, deployment=ready, previous=same, now="T3")
    assert conditions(flipped)["Ready"]["lastTransitionTime"] == "T3"
    assert conditions(flipped)["Degraded"]["lastTransitionTime"] == "T1"  # stayed False
    assert not status.changed(
        flipped, status.compute_status(**kw, deployment=ready, previous=flipped, now="T4")
    )


def test_scaled_to_zero_is_not_ready() -> None:
    dep = deployment_state()
    c = conditions(
        status.compute_status(
            generation=1, desired=0, selector="", endpoint="", deployment=dep, previous=None
        )
    )
    assert (c["Ready"]["status"], c["Ready"]["reason"]) == ("False", "ScaledToZero")
    assert c["Progressing"]["reason"] == "Complete"
