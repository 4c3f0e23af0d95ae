"""Collection of training images per label: retrieval, user folders, generation availability, output files."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from promptkit import collect
from promptkit.clip import load_clip
from promptkit.data.errors import DataError
from promptkit.data.sources import EmbeddedSource
from promptkit.negmine import NegativeLabels

from .cli_helpers import run_cli
from .integrity_helpers import flip_tensor_byte


def test_rank_pool_picks_each_labels_images_and_deduplicates():
    # 3 labels with orthogonal text features; pool image i belongs to label i % 3 (plus small noise)
    text = torch.eye(3, 8)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(12) % 3
    pool = text[labels] + 0.05 * torch.randn(12, 8, generator=g)
    indices, got = collect.rank_pool(pool, text, per_label=4)
    assert torch.equal(labels[indices], got)  # every retrieved image is of the label it was retrieved for
    assert sorted(indices.tolist()) == list(range(12))
    # image 12 is close to labels 0 and 1 (closer to 1): with top-5 both pick it, dedup keeps it with label 1
    extra = torch.cat([pool, (0.6 * text[0] + 0.8 * text[1])[None]])
    indices, got = collect.rank_pool(extra, text, per_label=5)
    assert indices.tolist().count(12) == 1 and int(got[indices == 12]) == 1
    kept_all, _ = collect.rank_pool(extra, text, per_label=5, deduplicate=False)
    assert kept_all.tolist().count(12) == 2
    with pytest.raises(ValueError, match=">= 1"):
        collect.rank_pool(pool, text, per_label=0)


@pytest.fixture(scope="module")
def tiny():
    return load_clip()


def test_retrieval_on_the_embedded_pool_finds_the_hidden_labels(tiny, tmp_path):
    source = EmbeddedSource("train")  # 100 images per ID class; retrieval never sees the labels
    pool = collect.open_pool(source, tiny, cache_dir=tmp_path, progress=False)
    collection = collect.retrieve(tiny, pool, source.class_names, per_label=10)
    assert collection.counts().tolist() == [10] * 6
    true = source.labels[[int(o.split("[")[1].rstrip("]")) for o in collection.origins]]
    precision = (true == collection.labels).float().mean().item()
    assert precision >= 0.9, precision  # the tiny model's zero-shot accuracy is 86 %; top-10 is cleaner


def test_pool_from_a_feature_file(tiny, tmp_path):
    path = tmp_path / "pool.safetensors"
    save_file({"features": torch.randn(5, tiny.embed_dim)}, str(path))
    pool = collect.open_pool(str(path), tiny)
    assert pool.features.shape == (5, tiny.embed_dim) and pool.origins[2] == f"{path}[2]"
    save_file({"features": torch.randn(5, 3)}, str(path))
    with pytest.raises(DataError, match=r"features must be \[P, 64\]"):
        collect.open_pool(str(path), tiny)


def test_user_folders_and_saved_files(tiny, tmp_path):
    source = EmbeddedSource("train")
    for name, index in (("dress", 0), ("grass", 1)):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        source.load(index).save(tmp_path / "imgs" / name / "0.png")
    collection = collect.from_folders(tiny, tmp_path / "imgs", ["coat", "dress", "grass"], cache_dir=tmp_path)
    assert collection.labels.tolist() == [1, 2]
    out = collect.save_collection(collection, tmp_path / "out")
    lines = (out / "collection.txt").read_text().splitlines()
    assert lines == [f"{tmp_path / 'imgs' / 'dress' / '0.png'} 1", f"{tmp_path / 'imgs' / 'grass' / '0.png'} 2"]
    assert (out / "classnames.txt").read_text().splitlines() == ["coat", "dress", "grass"]
    saved = load_file(str(out / "features.safetensors"))
    torch.testing.assert_close(saved["features"], collection.features)
    Image.new("RGB", (4, 4)).save(tmp_path / "imgs" / "dress" / "1.png")
    (tmp_path / "imgs" / "cat").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "imgs" / "cat" / "0.png")
    with pytest.raises(DataError, match="'cat' is not one of the 3 labels"):
        collect.from_folders(tiny, tmp_path / "imgs", ["coat", "dress", "grass"], cache_dir=tmp_path)


def test_saved_features_are_checksummed_and_verified_when_read_as_a_pool(tiny, tmp_path):
    collection = collect.Collection(torch.randn(3, tiny.embed_dim), torch.tensor([0, 1, 1]), ["a", "b", "c"],
                                    ["dress", "lamp"])
    negatives = NegativeLabels(("lamp", "red"), ("noun", "adjective"), torch.zeros(2))
    out = collect.save_collection(collection, tmp_path / "out", negatives=negatives)
    assert (out / "negatives.txt").read_text().splitlines() == ["noun\tlamp", "adjective\tred"]
    path = out / "features.safetensors"
    pool = collect.open_pool(str(path), tiny)
    assert torch.equal(pool.features, collection.features)
    flip_tensor_byte(path, "features", 2)
    with pytest.raises(DataError, match=r"features.safetensors: checksum mismatch, the file is corrupt") as info:
        collect.open_pool(str(path), tiny)
    assert "\n" not in str(info.value)
    collect.save_collection(collection, tmp_path / "plain")
    assert not (tmp_path / "plain" / "negatives.txt").exists()


def test_collect_images_retrieves_then_adds_the_users_folders(tiny, tmp_path):
    source = EmbeddedSource("train")
    (tmp_path / "imgs" / "grass").mkdir(parents=True)
    source.load(1).save(tmp_path / "imgs" / "grass" / "0.png")
    labels = source.class_names + ["grass"]
    options = {"cache_dir": tmp_path / "cache", "progress": False}
    collection, info = collect.collect_images(tiny, labels, 3, folders=tmp_path / "imgs", num_id=6, **options)
    retrieved = collect.retrieve(tiny, collect.open_pool(source, tiny, **options), labels, 3)
    assert collection.label_names == labels and len(collection) == len(retrieved) + 1
    assert collection.origins[-1] == str(tmp_path / "imgs" / "grass" / "0.png") and int(collection.labels[-1]) == 6
    assert info == {"pool": "embedded:train (labels ignored)", "pool_images": len(source),
                    "collected_images": len(collection), "labels_with_images": {"id": 6, "negative": 1}}
    path = collect.save_collection(collection, tmp_path / "out") / "features.safetensors"
    again, info = collect.collect_images(tiny, labels, 1, pool=str(path))
    assert info["pool"] == str(path) and info["pool_images"] == len(collection)
    assert info["labels_with_images"] == {"id": len(again), "negative": 0}  # all labels count as ID by default


def test_collect_images_refuses_generation_before_any_work(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(collect.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(collect, "open_pool", lambda *a, **k: pytest.fail("the pool was opened"))
    with pytest.raises(collect.CollectionUnavailableError, match="diffusers is not installed"):
        collect.collect_images(tiny, ["dress"], 1, generate_model="stabilityai/sdxl", generated_dir=tmp_path)
    with pytest.raises(ValueError, match="generate_model needs generated_dir"):
        collect.collect_images(tiny, ["dress"], 1, generate_model="stabilityai/sdxl")
    with pytest.raises(ValueError, match=r"num_id must lie in \[0, 1\]"):
        collect.collect_images(tiny, ["dress"], 1, num_id=2)


def test_generation_reports_why_it_is_unavailable(monkeypatch, tmp_path):
    monkeypatch.setattr(collect.importlib.util, "find_spec", lambda name: None)
    assert "diffusers is not installed" in collect.generation_unavailable()
    with pytest.raises(collect.CollectionUnavailableError, match="diffusers is not installed"):
        collect.generate(["dress"], 1, tmp_path, "stabilityai/sdxl")
    monkeypatch.setattr(collect.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(collect.torch.cuda, "is_available", lambda: False)
    assert collect.generation_unavailable() == "no CUDA GPU is available"


def test_collect_command(tmp_path):
    vocab = tmp_path / "words.txt"
    vocab.write_text("gravel\ngrass\nlamp\ncloud\na\tred\n")
    out = tmp_path / "collected"
    result = run_cli("collect", "--output", str(out), "--set", "train_negatives=3", "--set", f"vocabulary={vocab}",
                     "--set", "images_per_label=2", "--no-progress", cwd=tmp_path, cache=tmp_path / "cache")
    assert "(6 ID, 3 negative)" in result.stdout
    names = (out / "classnames.txt").read_text().splitlines()
    assert names[:6] == EmbeddedSource("test").class_names and len(names) == 9
    assert len((out / "negatives.txt").read_text().splitlines()) == 3
    saved = load_file(str(out / "features.safetensors"))
    assert len(saved["labels"]) == len((out / "collection.txt").read_text().splitlines()) <= 18
