"""A model loaded without its text tower: only visual weights are read, and its image features, transform and
fingerprint are the full model's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import promptkit.clip.model as model_module
from promptkit.clip import ImageTower, ModelLoadError, load_clip
from promptkit.clip.model import create_model


def _weights(path: Path, name: str) -> Path:
    model, _ = create_model(name, quick_gelu=False, random=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _same_images(a, b, images: torch.Tensor, atol: float = 0.0) -> None:
    torch.testing.assert_close(a.encode_images(images), b.encode_images(images), rtol=0, atol=atol)


@pytest.mark.parametrize("kind", ["pk-causal", "pk-siglip", "pk-coca", "pk-roberta"])
def test_image_tower_alone_gives_the_same_features(tower_configs: dict[str, Path], tmp_path: Path,
                                                   kind: str) -> None:
    path = _weights(tmp_path / f"{kind}.safetensors", str(tower_configs[kind]))
    full = load_clip(str(tower_configs[kind]), path)
    alone = load_clip(str(tower_configs[kind]), path, text_tower=False)
    assert isinstance(alone.model, ImageTower) and not alone.has_text_tower and alone.tokenizer is None
    assert alone.fingerprint == full.fingerprint and alone.name == full.name
    assert repr(alone.preprocess) == repr(full.preprocess)  # the feature cache key is the full model's
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    _same_images(alone, full, images)
    full_params = sum(p.numel() for p in full.model.parameters())
    assert sum(p.numel() for p in alone.model.parameters()) == sum(p.numel() for p in full.model.visual.parameters())
    assert sum(p.numel() for p in alone.model.parameters()) < full_params
    with pytest.raises(ModelLoadError, match="loaded without its text tower"):
        alone.encode_texts(["a dog"])


def test_image_tower_of_the_tiny_model_and_random_weights(tiny, tiny_weights: Path) -> None:
    alone = load_clip("promptkit-tiny", tiny_weights, text_tower=False)
    images = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    _same_images(alone, tiny, images)
    random_full, random_alone = load_clip("promptkit-tiny", "random"), load_clip("promptkit-tiny", "random",
                                                                                 text_tower=False)
    _same_images(random_alone, random_full, images)
    assert not any(p.requires_grad for p in alone.model.parameters()) and not alone.model.training


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_image_tower_in_low_precision(tiny_weights: Path, precision: str) -> None:
    full = load_clip("promptkit-tiny", tiny_weights, precision=precision)
    alone = load_clip("promptkit-tiny", tiny_weights, precision=precision, text_tower=False)
    assert alone.model.visual.conv1.weight.dtype == full.model.visual.conv1.weight.dtype
    _same_images(alone, full, torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(2)))


def test_other_layouts_fall_back_to_the_full_loader(monkeypatch: pytest.MonkeyPatch, tiny, tiny_weights: Path
                                                    ) -> None:
    """A checkpoint whose visual keys need open_clip's conversions loads through load_checkpoint, then is cut."""
    monkeypatch.setattr(model_module, "_visual_state", lambda name, path: {})
    alone = load_clip("promptkit-tiny", tiny_weights, text_tower=False)
    assert isinstance(alone.model, ImageTower)
    _same_images(alone, tiny, torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(3)))


def test_corrupt_file_is_one_line(tiny_weights: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(tiny_weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match=r"cannot read weights file .*cut\.safetensors") as info:
        load_clip("promptkit-tiny", cut, text_tower=False)
    assert "\n" not in str(info.value)


def test_half_precision_file_loads_into_an_fp32_tower(tiny, tiny_weights: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    half = tmp_path / "half.safetensors"
    save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(str(tiny_weights)).items()},
              str(half))
    full, alone = load_clip("promptkit-tiny", half), load_clip("promptkit-tiny", half, text_tower=False)
    assert alone.model.visual.conv1.weight.dtype == torch.float32
    _same_images(alone, full, torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(4)))
