"""Finds a model on disk and loads its config, tokenizer and weights.

Hugging Face directories are read directly (config.json + safetensors). A GGUF
file is dequantized once (kvmesh.worker.model.convert) and cached as a
safetensors directory, so later starts take seconds.

Locating a model (``locate_model``) imports nothing heavy, so a wrong ``--model``
fails in a fraction of a second with one line that says what is wrong.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kvmesh.models import DEFAULT_MODEL_NAME, default_gguf_path

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

# Sampling settings read from generation_config.json (vLLM reads the same ones).
GENERATION_DEFAULT_KEYS = ("temperature", "top_p", "top_k")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class ModelNotFound(FileNotFoundError):
    """The model argument names nothing usable; the message is one line a user can act on."""


@dataclass(slots=True)
class ModelSource:
    kind: str  # "directory" | "gguf" | "hub"
    location: str  # a local path, or a Hub repository id
    name: str  # the served model name


@dataclass(slots=True)
class ModelFiles:
    directory: Path  # a Hugging Face style directory: config.json, tokenizer, *.safetensors
    name: str  # the served model name


def cache_root() -> Path:
    return Path(os.environ.get("KVMESH_CACHE", Path.home() / ".cache" / "kvmesh"))


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or model.endswith(".gguf") or model.count("/") > 1


def locate_model(model: str) -> ModelSource:
    """``default``, a local directory or .gguf file, or a Hub repository (``hf://org/name``, or
    ``org/name`` when no such local path exists). Raises ModelNotFound; imports nothing heavy."""
    if model == "default":
        return ModelSource("gguf", str(default_gguf_path()), DEFAULT_MODEL_NAME)
    if model.startswith("hf://"):
        spec = model.removeprefix("hf://")
        if spec.count("/") < 1:
            raise ModelNotFound(f"model {model!r}: a Hub model is hf://ORG/REPO[@REVISION][/FILE]")
        return ModelSource("hub", spec, hub_parts(spec)[0])
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFound(f"model {model!r} is a file but not a .gguf model")
        return ModelSource("gguf", str(path), path.stem)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource("directory", str(path), path.name)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", str(ggufs[0]), ggufs[0].stem)
        raise ModelNotFound(
            f"model directory {model!r} has no config.json (not a Hugging Face model directory)"
            + (f" and {len(ggufs)} .gguf files: name one" if ggufs else "")
        )
    if _REPO_ID.fullmatch(model) and not _looks_like_path(model):
        owner = Path(model.split("/", 1)[0])
        if owner.is_dir():  # ./owner exists: the user more likely meant a local path
            raise ModelNotFound(
                f"model {model!r} does not exist under ./{owner}; "
                f"for the Hugging Face Hub repository write hf://{model}"
            )
        return ModelSource("hub", model, model)
    if _looks_like_path(model) or os.sep in model:
        raise ModelNotFound(f"model path {model!r} does not exist")
    raise ModelNotFound(
        f"model {model!r} not found: give a local directory or .gguf file, a Hub id (org/name) or 'default'"
    )


def resolve_model(model: str) -> ModelFiles:
    """The model as a local Hugging Face directory: GGUF files converted once, Hub repositories
    downloaded (``hf://ORG/REPO[@REVISION][/FILE]``: everything comes from the one flag)."""
    from kvmesh.worker.model.convert import ensure_converted

    source = locate_model(model)
    if source.kind == "directory":
        return ModelFiles(Path(source.location), source.name)
    if source.kind == "gguf":
        return ModelFiles(ensure_converted(Path(source.location)), source.name)
    return _from_hub(source.location)


def hub_parts(spec: str) -> tuple[str, str | None, str | None]:
    """``ORG/REPO[@REVISION][/FILE]`` -> (repository id, revision, file inside it)."""
    owner, name, *rest = spec.split("/", 2)
    name, _, revision = name.partition("@")
    return f"{owner}/{name}", revision or None, (rest[0] if rest else None)


def _from_hub(spec: str) -> ModelFiles:
    """Downloads (or finds in the Hugging Face cache) the files a worker needs from a Hub repo:
    ``ORG/REPO[@REVISION][/FILE.gguf]``."""
    from huggingface_hub import snapshot_download

    from kvmesh.worker.model.convert import ensure_converted

    repo, revision, gguf_file = hub_parts(spec)
    patterns = ["*.json", "*.jinja", "tokenizer*", "*.model"]
    patterns += [gguf_file] if gguf_file else ["*.safetensors"]
    try:
        local = Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated repo without a token, ...
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelNotFound(f"cannot fetch model {repo!r} from the Hugging Face Hub: {reason}") from e
    if gguf_file:
        return ModelFiles(ensure_converted(local / gguf_file), repo)
    return ModelFiles(local, repo)


def load_config(directory: Path) -> PretrainedConfig:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(directory)


def load_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


class SafetensorsWeights(Mapping):
    """The tensors of a model's *.safetensors files, each read from its memory-mapped file only
    when asked for (whole, or as the slice a tensor-parallel rank holds), so loading never holds a
    second full copy of the weights."""

    def __init__(self, files: list[Path]) -> None:
        from safetensors import safe_open

        self._where = {}
        for f in files:
            handle = safe_open(str(f), framework="pt")
            self._where.update((name, handle) for name in handle.keys())  # noqa: SIM118 (not iterable)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)

    def __contains__(self, name: object) -> bool:  # Mapping's default would read the tensor
        return name in self._where

    def get_slice(self, name: str):
        """A lazy view of one tensor: indexing it (``[a:b]``, ``[:, a:b]``) reads only those
        elements from the file, so a tensor-parallel rank never holds another rank's shard."""
        return self._where[name].get_slice(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def load_state_dict(directory: Path) -> Mapping[str, torch.Tensor]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {directory}")
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [directory / n for n in names]
    return SafetensorsWeights(files)


def _generation_config(directory: Path) -> dict:
    path = directory / "generation_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def eos_token_ids(config: PretrainedConfig, directory: Path) -> set[int]:
    """The ids that end a generation, as transformers' generate() sees them."""
    ids: set[int] = set()
    for value in (_generation_config(directory).get("eos_token_id"), getattr(config, "eos_token_id", None)):
        if value is None:
            continue
        ids.update(value if isinstance(value, list) else [value])
    return ids


def generation_defaults(directory: Path) -> dict[str, float | int]:
    """The model's own sampling defaults (temperature, top_p, top_k) from generation_config.json."""
    gen = _generation_config(directory)
    return {k: gen[k] for k in GENERATION_DEFAULT_KEYS if gen.get(k) is not None}
