"""Finds a model on disk and loads its config, tokenizer and weights.

Hugging Face directories are read directly (config.json + safetensors). A GGUF
file is dequantized once through transformers and cached as a safetensors
directory keyed by the file's identity, so later starts take seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from kvmesh.models import DEFAULT_MODEL_NAME, default_gguf_path

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ModelFiles:
    directory: Path  # a Hugging Face style directory: config.json, tokenizer, *.safetensors
    name: str  # the served model name


def cache_root() -> Path:
    return Path(os.environ.get("KVMESH_CACHE", Path.home() / ".cache" / "kvmesh"))


def resolve_model(model: str) -> ModelFiles:
    """``default``, a local directory or .gguf file, or a Hub repository (``hf://org/name`` or
    ``org/name``; revision and a GGUF file inside it from KVMESH_MODEL_REVISION / KVMESH_MODEL_FILE)."""
    if model == "default":
        return ModelFiles(_gguf_to_directory(default_gguf_path()), DEFAULT_MODEL_NAME)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelFiles(_gguf_to_directory(path), path.stem)
    if path.is_dir() and (path / "config.json").is_file():
        return ModelFiles(path, path.name)
    repo = model.removeprefix("hf://")
    if model.startswith("hf://") or (not path.exists() and _REPO_ID.fullmatch(repo)):
        return _from_hub(repo)
    raise FileNotFoundError(
        f"model {model!r} is not a Hugging Face directory, a .gguf file, a Hub repository or 'default'"
    )


def _from_hub(repo: str) -> ModelFiles:
    """Downloads (or finds in the Hugging Face cache) the files a worker needs from a Hub repo."""
    from huggingface_hub import snapshot_download

    revision = os.environ.get("KVMESH_MODEL_REVISION") or None
    gguf_file = os.environ.get("KVMESH_MODEL_FILE") or None
    patterns = ["*.json", "*.jinja", "tokenizer*", "*.model"]
    patterns += [gguf_file] if gguf_file else ["*.safetensors"]
    try:
        local = Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated repo without a token, ...
        raise FileNotFoundError(f"cannot fetch model {repo!r} from the Hugging Face Hub: {e}") from e
    if gguf_file:
        return ModelFiles(_gguf_to_directory(local / gguf_file), repo)
    return ModelFiles(local, repo)


_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _gguf_to_directory(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:16]
    target = cache_root() / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM

    log.info("Converting GGUF model %s into %s (once)", gguf, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers will not save_pretrained a GGUF-dequantized model, so write the parts directly.
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"))
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process converted it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_config(directory: Path) -> PretrainedConfig:
    return AutoConfig.from_pretrained(directory)


def load_tokenizer(directory: Path):
    return AutoTokenizer.from_pretrained(directory)


def load_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {directory}")
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [directory / n for n in names]
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def eos_token_ids(config: PretrainedConfig, directory: Path) -> set[int]:
    """The ids that end a generation, as transformers' generate() sees them."""
    ids: set[int] = set()
    gen = directory / "generation_config.json"
    sources = [json.loads(gen.read_text()).get("eos_token_id")] if gen.is_file() else []
    sources.append(getattr(config, "eos_token_id", None))
    for value in sources:
        if value is None:
            continue
        ids.update(value if isinstance(value, list) else [value])
    return ids
