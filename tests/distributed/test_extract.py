"""Sharded feature extraction under torchrun (2 CPU processes, gloo): same cache as 1 rank, resumes after a kill."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from promptkit.clip import load_clip
from promptkit.data import ImageFolderSource, extract_features

from .extract_worker import MeanColourEncoder


def _entry(cache: Path) -> tuple[dict, Path]:
    (index,) = cache.glob("*.json")
    return json.loads(index.read_text()), index.with_suffix(".shards")


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """22 solid-colour images in two classes, one of them unreadable (none black: the mean-colour encoder would
    give it an all-zero feature row, which extraction refuses)."""
    root = tmp_path / "images"
    for i in range(22):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        colour = ((i * 7 + 1) % 256, (i * 13 + 1) % 256, (i * 29 + 1) % 256)
        Image.new("RGB", (6, 6), colour).save(root / f"c{i % 2}" / f"{i:02d}.png")
    (root / "c1" / "07.png").write_bytes(b"not an image")
    return root


def test_two_ranks_write_the_same_cache_as_one(tmp_path: Path, images: Path, torchrun) -> None:
    caches = {n: tmp_path / f"cache{n}" for n in (1, 2)}
    for n, cache in caches.items():
        torchrun(n, ["-m", "promptkit", "extract", "--images", str(images), "--cache-dir", str(cache),
                     "--shard-size", "6", "--batch-size", "4", "--no-progress"], cwd=tmp_path)
    (meta1, shards1), (meta2, shards2) = _entry(caches[1]), _entry(caches[2])
    assert meta1["shards"] == meta2["shards"] and len(meta1["shards"]) == 4  # 22 images in shards of 6
    assert meta1["skipped"] == meta2["skipped"] and meta1["skipped"][0].endswith("c1/07.png")
    for name in meta1["shards"]:  # same order, same values, same unreadable list in every shard
        with safe_open(str(shards1 / name), "pt") as one, safe_open(str(shards2 / name), "pt") as two:
            assert one.metadata() == two.metadata()
            for key in ("features", "labels", "kept"):
                assert torch.equal(one.get_tensor(key), two.get_tensor(key))

    # The entry serves a plain single-process call, and matches a cache-free extraction in this process.
    clip, source = load_clip(), ImageFolderSource(images)
    with pytest.warns(UserWarning, match="skipped 1 of 22"):
        cached = extract_features(clip, source, cache_dir=caches[2], progress=False, shard_size=6)
        fresh = extract_features(clip, source, batch_size=4, use_cache=False, progress=False)
    torch.testing.assert_close(cached.features, fresh.features, rtol=1e-5, atol=1e-5)
    assert torch.equal(cached.labels, fresh.labels) and torch.equal(cached.kept, fresh.kept)
    assert cached.kept.tolist() == [i for i in range(22) if i != 14]  # c0's 11 images, then c1's; 07 is 14th


def test_killed_extraction_resumes_without_redoing_finished_shards(tmp_path: Path, images: Path, torchrun,
                                                                   worker) -> None:
    cache, report = tmp_path / "cache", tmp_path / "report"
    # 22 images in shards of 4 -> 6 shards, ranks 0 and 1 own 3 each; rank 1 encodes 2 images per call and
    # SIGKILLs itself at its 3rd call, inside its second shard.
    killed = torchrun(2, [worker("extract_worker.py"), str(images), str(cache), "4", str(report), "1", "3"],
                      cwd=tmp_path, check=False)
    assert killed.returncode != 0
    assert not list(cache.glob("*.json"))  # no index: the entry is not complete
    done = sorted(p.name for p in cache.glob("*.shards/*.safetensors"))
    assert "0000000012-0000000016.safetensors" in done  # rank 1's first shard survived
    assert "0000000016-0000000020.safetensors" not in done  # the one it died in did not
    assert not list(cache.rglob(".*.tmp"))

    torchrun(2, [worker("extract_worker.py"), str(images), str(cache), "4", str(report)], cwd=tmp_path)
    encoded = sum(int((tmp_path / f"report.{r}").read_text().split()[1]) for r in (0, 1))
    finished_images = sum(int(n[11:21]) - int(n[:10]) for n in done)
    unreadable_in_finished = 1  # c1/07.png is image 14 (after c0's 11), in rank 1's first shard [12, 16)
    assert encoded == 22 - 1 - (finished_images - unreadable_in_finished)  # only the unfinished shards ran

    encoder = MeanColourEncoder(kill_at=None)
    with pytest.warns(UserWarning, match="skipped 1 of 22"):
        resumed = extract_features(encoder, ImageFolderSource(images), cache_dir=cache, progress=False,
                                   shard_size=4)
    assert encoder.calls == 0  # served from the completed cache
    with pytest.warns(UserWarning, match="skipped 1 of 22"):
        fresh = extract_features(encoder, ImageFolderSource(images), use_cache=False, progress=False)
    for name in ("features", "labels", "kept"):
        assert torch.equal(getattr(resumed, name), getattr(fresh, name))
    assert resumed.skipped == fresh.skipped and resumed.skipped[0].endswith("c1/07.png")
    assert load_file(next(cache.glob("*.shards/0000000020-0000000022.safetensors")))["kept"].tolist() == [20, 21]
