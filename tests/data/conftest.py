"""Helpers for the data tests: tiny solid-colour images and a fake CLIP whose features are mean colours."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms


def _write_image(path: Path, color: tuple[int, int, int], size: int = 6) -> Path:
    """A solid ``color`` image at ``path`` (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)
    return path


def _color_of(index: int) -> tuple[int, int, int]:
    """A distinct, exactly representable colour per index, never black (black has all-zero FakeClip features,
    which extraction refuses)."""
    return ((index * 7 + 1) % 256, (index * 13 + 1) % 256, (index * 29 + 1) % 256)


class FakeClip:
    """Stands in for a CLIP wrapper: features are the per-channel mean of the preprocessed image, scaled by 2.

    ``calls`` counts ``encode_images`` calls so tests can tell a cache hit from a miss.
    """

    name = "fake-clip"

    def __init__(self, fingerprint: str = "fake-v1") -> None:
        self.fingerprint = fingerprint
        self.preprocess = transforms.Compose([transforms.Resize(4), transforms.CenterCrop(4), transforms.ToTensor()])
        self.calls = 0

    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return 2.0 * x.mean(dim=(2, 3))


def _expected_features(colors: list[tuple[int, int, int]]) -> torch.Tensor:
    """What FakeClip returns for solid images of these colours: 2 * colour / 255."""
    return 2.0 * torch.tensor(colors, dtype=torch.float32) / 255.0


# The helpers reach the tests as fixtures: test folders are not on sys.path under --import-mode=importlib.
@pytest.fixture
def write_image():
    return _write_image


@pytest.fixture
def color_of():
    return _color_of


@pytest.fixture
def solid_folder(tmp_path: Path):
    """solid_folder(n): ``tmp_path/images`` with n solid-colour images (colour i) in classes c0 and c1, by parity."""
    def make(n: int) -> Path:
        root = tmp_path / "images"
        for i in range(n):
            _write_image(root / f"c{i % 2}" / f"{i}.png", _color_of(i))
        return root

    return make


@pytest.fixture
def expected_features():
    return _expected_features


@pytest.fixture
def write_embedded():
    return _write_embedded


@pytest.fixture
def make_clip():
    return FakeClip


@pytest.fixture
def class_tree(tmp_path: Path) -> Path:
    """``tree/<cls>/<i>.png`` with classes b_dog (3 images) and a_cat (2 images) and some non-images."""
    root = tmp_path / "tree"
    for i in range(2):
        _write_image(root / "a_cat" / f"{i}.png", _color_of(i))
    for i in range(3):
        _write_image(root / "b_dog" / f"{i}.png", _color_of(10 + i))
    (root / "b_dog" / "notes.txt").write_text("not an image")
    _write_image(root / "b_dog" / ".hidden.png", (1, 2, 3))
    return root


def _write_embedded(folder: Path) -> dict[str, np.ndarray]:
    """A small ``embedded.npz`` + ``embedded.json`` in the format the asset builder writes."""
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
        "train_labels": np.array([0, 1, 2, 0, 1, 2], dtype=np.int64),
        "test_images": rng.integers(0, 256, (4, 28, 28), dtype=np.uint8),
        "test_labels": np.array([2, 1, 0, 0], dtype=np.int64),
        "ood_digits_images": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        "ood_fashion-heldout_images": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "embedded.npz", **arrays)
    meta = {"id_classes": ["shirt", "bag", "boot"],
            "ood_sets": {"digits": "handwritten digits", "fashion-heldout": "held-out garments"}}
    (folder / "embedded.json").write_text(json.dumps(meta))
    return arrays
