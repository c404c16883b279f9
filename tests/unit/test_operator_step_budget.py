"""engine.maxNumBatchedTokens and engine.decodeTokenBudget: optional in the CRD, passed to the worker
only when set (so existing deployments do not roll), parsed by the worker's own CLI."""

from __future__ import annotations

import argparse

from kvmesh.operator import crd, workerpod
from kvmesh.operator.spec import DeploymentSpec


def command(**engine: object) -> list[str]:
    spec = DeploymentSpec.parse({"model": {"source": "hf://org/model"}, "engine": engine})
    return workerpod.worker_command("chat", "serving", spec)


def test_budgets_reach_the_worker_config_only_when_set() -> None:
    from kvmesh.worker import cli as worker_cli
    from kvmesh.worker.engine.config import EngineConfig

    plain = command()
    assert "--max-num-batched-tokens" not in plain and "--decode-token-budget" not in plain
    tuned = command(maxNumBatchedTokens=8192, decodeTokenBudget=512)
    parser = argparse.ArgumentParser()
    worker_cli.configure(parser)
    config = EngineConfig(**worker_cli.engine_kwargs(parser.parse_args(tuned[2:])))
    config.validate()
    assert (config.max_num_batched_tokens, config.decode_token_budget) == (8192, 512)
    untouched = EngineConfig(**worker_cli.engine_kwargs(parser.parse_args(plain[2:])))
    assert (untouched.max_num_batched_tokens, untouched.decode_token_budget) == (2048, 1024)


def test_the_schema_bounds_both_and_defaults_neither() -> None:
    engine = crd.spec_schema()["properties"]["engine"]["properties"]
    for name in ("maxNumBatchedTokens", "decodeTokenBudget"):
        assert engine[name]["type"] == "integer" and engine[name]["minimum"] == 1
        assert "default" not in engine[name]
