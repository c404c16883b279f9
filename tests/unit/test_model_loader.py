"""Model resolution: local directories, GGUF files, the default model, Hub repository ids."""

from __future__ import annotations

import pytest

from kvmesh.models import DEFAULT_MODEL_NAME
from kvmesh.worker.model.loader import resolve_model


def test_default_model_resolves_to_a_converted_directory(smollm_dir):
    files = resolve_model("default")
    assert files.name == DEFAULT_MODEL_NAME
    assert files.directory == smollm_dir
    assert (files.directory / "config.json").is_file()
    assert list(files.directory.glob("*.safetensors"))


def test_a_local_directory_is_used_in_place(smollm_dir):
    files = resolve_model(str(smollm_dir))
    assert files.directory == smollm_dir


def test_a_hub_repository_that_cannot_be_fetched_gives_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="cannot fetch model 'nobody/no-such-model'"):
        resolve_model("hf://nobody/no-such-model")


def test_a_path_that_is_neither_directory_file_nor_repo_is_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "missing" / "deep" / "path"))
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        resolve_model(str(tmp_path))
