"""Where ``--model`` points, decided without torch: each wrong argument is one actionable line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvmesh.models import DEFAULT_MODEL_NAME
from kvmesh.worker.model.loader import ModelNotFound, hub_parts, locate_model


def test_default_is_the_embedded_gguf():
    source = locate_model("default")
    assert source.kind == "gguf" and source.location.endswith(".gguf")
    assert source.name == DEFAULT_MODEL_NAME


def test_a_missing_relative_path_says_it_does_not_exist(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for model in ("./models/smol", "../nowhere", "smol.gguf", "a/b/c"):
        with pytest.raises(ModelNotFound, match="does not exist"):
            locate_model(model)


def test_org_name_is_a_hub_id_unless_a_local_folder_of_that_name_exists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert locate_model("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"
    (tmp_path / "models").mkdir()
    with pytest.raises(ModelNotFound, match=r"does not exist under \./models; .* write hf://models/smol"):
        locate_model("models/smol")
    assert locate_model("hf://models/smol").kind == "hub"


def test_local_files_and_directories(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ModelNotFound, match=r"is a file but not a \.gguf model"):
        locate_model(str(tmp_path / "notes.txt"))
    with pytest.raises(ModelNotFound, match=r"has no config\.json"):
        locate_model(str(tmp_path))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert locate_model(str(tmp_path)).location == str(tmp_path / "m.gguf")  # the one GGUF inside
    (tmp_path / "config.json").write_text("{}")
    assert locate_model(str(tmp_path)).kind == "directory"


def test_a_bare_word_is_neither_path_nor_hub_id():
    with pytest.raises(ModelNotFound, match="not found: give a local directory"):
        locate_model("smollm")


def test_hub_references_carry_revision_and_file():
    assert hub_parts("org/repo") == ("org/repo", None, None)
    assert hub_parts("org/repo@v2/model.Q4.gguf") == ("org/repo", "v2", "model.Q4.gguf")
    assert locate_model("hf://org/repo@v2").name == "org/repo"
    with pytest.raises(ModelNotFound, match="hf://ORG/REPO"):
        locate_model("hf://justone")


def test_locating_imports_no_torch():
    code = "import sys; from kvmesh.worker.model.loader import locate_model; locate_model('default'); "
    code += "print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
