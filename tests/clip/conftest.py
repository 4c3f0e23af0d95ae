"""Shared models for the model-layer tests: the tiny config with random weights saved to a file, and a random
ViT-B-16 (built once per session: its init takes a few seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import save_file

from promptkit.clip import ClipModel, load_clip
from promptkit.clip.model import create_model


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A safetensors file with random weights for the promptkit-tiny config (the embedded one may not exist)."""
    model, _ = create_model("promptkit-tiny", quick_gelu=False, random=True)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="session")
def tiny(tiny_weights: Path) -> ClipModel:
    return load_clip("promptkit-tiny", tiny_weights)


@pytest.fixture(scope="session")
def vit_b16() -> ClipModel:
    return load_clip("ViT-B-16", "random")


@pytest.fixture(scope="session")
def tower_configs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Model config files of every text tower kind (``towers.KINDS``), built offline; needs transformers."""
    pytest.importorskip("transformers")
    from .towers import write_configs

    return write_configs(tmp_path_factory.mktemp("towers"))
