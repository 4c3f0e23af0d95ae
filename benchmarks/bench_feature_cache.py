"""Feature cache: extraction with a cache miss (decode + encode + write) vs a hit (fingerprint + read).

200 small PNGs in two class folders. The encoder is the embedded tiny CLIP when its weights
(promptkit.assets.MODEL_WEIGHTS) exist, else a fixed random linear map of the same output size.
Run: pytest benchmarks/bench_feature_cache.py -o addopts="" --benchmark-only
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from promptkit.assets import ASSETS_DIR, MODEL_NAME, MODEL_WEIGHTS
from promptkit.data import ImageFolderSource, extract_features

N_IMAGES = 200


class LinearEncoder:
    """A fixed random projection [3,28,28] -> [64], standing in for the tiny CLIP."""

    name = "linear-28"
    fingerprint = "linear-28-seed0"

    def __init__(self) -> None:
        self.preprocess = transforms.Compose([transforms.Resize(28), transforms.CenterCrop(28), transforms.ToTensor()])
        self.weight = torch.randn(3 * 28 * 28, 64, generator=torch.Generator().manual_seed(0))

    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight


class TinyClipEncoder:
    """The embedded tiny CLIP loaded with open_clip from the shipped config and weights."""

    name = MODEL_NAME

    def __init__(self) -> None:
        import open_clip

        open_clip.add_model_config(ASSETS_DIR)
        model, _, self.preprocess = open_clip.create_model_and_transforms(MODEL_NAME, pretrained=str(MODEL_WEIGHTS))
        self.model = model
        self.model.eval()
        self.fingerprint = hashlib.sha256(MODEL_WEIGHTS.read_bytes()).hexdigest()

    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x)


@pytest.fixture(scope="module")
def encoder():
    return TinyClipEncoder() if MODEL_WEIGHTS.is_file() else LinearEncoder()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench_images")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        folder = root / f"class{i % 2}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")
    return root


def test_cache_miss(benchmark, encoder, image_folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"

    def clear() -> None:
        shutil.rmtree(cache, ignore_errors=True)

    def run():
        return extract_features(encoder, ImageFolderSource(image_folder), batch_size=64, cache_dir=cache,
                                progress=False)

    feats = benchmark.pedantic(run, setup=clear, rounds=5, iterations=1)
    assert feats.features.shape[0] == N_IMAGES
    benchmark.extra_info["encoder"] = encoder.name


def test_cache_hit(benchmark, encoder, image_folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = extract_features(encoder, ImageFolderSource(image_folder), batch_size=64, cache_dir=cache, progress=False)

    def run():
        return extract_features(encoder, ImageFolderSource(image_folder), batch_size=64, cache_dir=cache,
                                progress=False)

    feats = benchmark(run)
    assert torch.equal(feats.features, first.features)
    benchmark.extra_info["encoder"] = encoder.name
