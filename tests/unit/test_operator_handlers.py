"""Handler wiring and the gateway's routing settings: no finalizers, no private kopf APIs, and
spec.routing reaching the gateway's options unless a flag pins them."""

from __future__ import annotations

import argparse
from pathlib import Path

import kopf

from kvmesh.operator import routing
from kvmesh.operator.builders import OperatorConfig
from kvmesh.operator.handlers import register
from kvmesh.operator.reconcile import Reconciler
from kvmesh.operator.spec import RoutingSpec

REPO = Path(__file__).resolve().parents[2]


def test_the_operator_uses_no_private_kopf_api() -> None:
    for path in (REPO / "operator").glob("*.py"):
        assert "kopf._" not in path.read_text(), path.name


def test_no_handler_puts_a_finalizer_and_nothing_polls_per_object() -> None:
    """Deletion never waits for the operator; status comes from the children's watch, not timers."""
    registry = kopf.OperatorRegistry()
    register(registry, Reconciler(kube=None, config=OperatorConfig()), resync=10)  # type: ignore[arg-type]
    # Inspecting the registry is the only way to see what kopf will do per object.
    changing = registry._changing._handlers
    assert len(changing) >= 3 and not [h.id for h in changing if h.requires_finalizer]
    assert registry._spawning._handlers == []  # no timers or daemons (kopf gives those finalizers)
    watched = {(h.selector.group, h.selector.any_name) for h in registry._watching._handlers}
    assert {("apps", "deployments"), ("", "services"), ("policy", "poddisruptionbudgets")} <= watched


def test_repeated_errors_post_one_event() -> None:
    r = Reconciler(kube=None, config=OperatorConfig())  # type: ignore[arg-type]
    assert r.is_new_error("ns", "a", "refused")
    assert not r.is_new_error("ns", "a", "refused")
    assert r.is_new_error("ns", "a", "refused differently")
    assert not r.is_new_error("ns", "a", None)
    assert r.is_new_error("ns", "a", "refused")  # after a success, the same error is news again


def gateway_args(*argv: str) -> argparse.Namespace:
    from kvmesh.gateway import cli as gateway_cli

    parser = argparse.ArgumentParser()
    gateway_cli.configure(parser)
    return parser.parse_args(["--redis-url", "redis://r:6379/0", *argv])


def test_gateway_routes_by_the_published_spec_routing_unless_a_flag_pins_it() -> None:
    from kvmesh.gateway.cli import options_from_args

    published = routing.routing_fields(RoutingSpec("least-load", 2.5))
    options = options_from_args(gateway_args("--deployment", "serving/llama"), published)
    assert (options.policy, options.load_factor, options.deployment) == ("least-load", 2.5, "serving/llama")
    pinned = options_from_args(gateway_args("--policy", "round-robin", "--load-factor", "1.5"), published)
    assert (pinned.policy, pinned.load_factor) == ("round-robin", 1.5)
    defaults = options_from_args(gateway_args(), {"policy": "bogus", "load_factor": "x"})
    assert (defaults.policy, defaults.load_factor) == ("prefix", 1.25)


def test_a_routing_change_changes_the_hash_that_rolls_the_gateways() -> None:
    a = routing.routing_hash(RoutingSpec("prefix", 1.25))
    assert a == routing.routing_hash(RoutingSpec("prefix", 1.25))
    assert a != routing.routing_hash(RoutingSpec("prefix", 1.5))
    assert a != routing.routing_hash(RoutingSpec("least-load", 1.25))
