"""engine.quantization and engine.kvCacheDtype: optional in the CRD with the worker's own choices,
passed to the worker only when set (so existing deployments do not roll), parsed by the worker's CLI."""

from __future__ import annotations

import argparse

from kvmesh.operator import crd, workerpod
from kvmesh.operator.spec import DeploymentSpec


def command(**engine: object) -> list[str]:
    spec = DeploymentSpec.parse({"model": {"source": "hf://org/model"}, "engine": engine})
    return workerpod.worker_command("chat", "serving", spec)


def worker_config(argv: list[str]):
    from kvmesh.worker import cli as worker_cli
    from kvmesh.worker.engine.config import EngineConfig

    parser = argparse.ArgumentParser()
    worker_cli.configure(parser)
    config = EngineConfig(**worker_cli.engine_kwargs(parser.parse_args(argv[2:])))
    config.validate()
    return config


def test_choices_reach_the_worker_config_only_when_set() -> None:
    plain = command()
    assert "--quantization" not in plain and "--kv-cache-dtype" not in plain
    untouched = worker_config(plain)
    assert (untouched.quantization, untouched.kv_cache_dtype) == ("auto", "auto")
    for quantization in ("none", "fp8", "gptq", "awq", "gguf", "auto"):
        config = worker_config(command(quantization=quantization, kvCacheDtype="fp8"))
        assert (config.quantization, config.kv_cache_dtype) == (quantization, "fp8")


def test_the_schema_offers_the_workers_choices_and_defaults_neither() -> None:
    from kvmesh.worker.engine.config import KV_CACHE_DTYPES, QUANTIZATIONS

    engine = crd.spec_schema()["properties"]["engine"]["properties"]
    assert tuple(engine["quantization"]["enum"]) == QUANTIZATIONS
    assert tuple(engine["kvCacheDtype"]["enum"]) == KV_CACHE_DTYPES
    for name in ("quantization", "kvCacheDtype"):
        assert engine[name]["type"] == "string" and "default" not in engine[name]
    defaulted = crd.apply_defaults({"model": {"source": "hf://a/b"}})["engine"]
    assert "quantization" not in defaulted and "kvCacheDtype" not in defaulted
