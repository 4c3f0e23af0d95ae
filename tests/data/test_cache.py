from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch

import promptkit.data.integrity as integrity_mod
from promptkit.data import (
    BadImageError,
    DataError,
    EmbeddedSource,
    ImageFolderSource,
    Subset,
    cache_key,
    extract_features,
)
from promptkit.data.cache import FEATURE_KIND, entry_key, feature_entry
from promptkit.data.integrity import load_tensors
from promptkit.negmine import TEXT_KIND, embed_words, text_cache_entry

from ..integrity_helpers import flip_tensor_byte


@pytest.fixture
def folder(solid_folder) -> Path:
    """Two classes of three solid-colour images."""
    return solid_folder(6)


def _colors_in_order(source: ImageFolderSource, color_of) -> list[tuple[int, int, int]]:
    return [color_of(int(Path(source.describe(i)).stem)) for i in range(len(source))]


def test_miss_then_hit_returns_identical_tensors(folder: Path, tmp_path: Path, make_clip, color_of,
                                                 expected_features) -> None:
    clip = make_clip()
    src = ImageFolderSource(folder)
    first = extract_features(clip, src, batch_size=4, cache_dir=tmp_path / "cache", progress=False)
    assert clip.calls == 2  # 6 images in batches of 4
    assert first.features.dtype == torch.float32 and first.features.shape == (6, 3)
    torch.testing.assert_close(first.features, expected_features(_colors_in_order(src, color_of)))
    assert first.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert first.kept.tolist() == list(range(6)) and first.skipped == []

    second = extract_features(clip, ImageFolderSource(folder), cache_dir=tmp_path / "cache", progress=False)
    assert clip.calls == 2  # served from the cache
    for name in ("features", "labels", "kept"):
        assert torch.equal(getattr(first, name), getattr(second, name))
    files = sorted(p.suffix for p in (tmp_path / "cache").iterdir())
    assert files == [".json", ".safetensors"]
    meta = json.loads(next((tmp_path / "cache").glob("*.json")).read_text())
    assert meta["model"] == "fake-clip" and meta["n_features"] == 6 and meta["feature_dim"] == 3


def test_batch_size_does_not_change_features(folder: Path, make_clip) -> None:
    src = ImageFolderSource(folder)
    one = extract_features(make_clip(), src, batch_size=1, use_cache=False, progress=False)
    all_ = extract_features(make_clip(), src, batch_size=64, use_cache=False, progress=False)
    assert torch.equal(one.features, all_.features)


def test_touching_or_adding_a_file_invalidates(folder: Path, tmp_path: Path, make_clip, write_image) -> None:
    clip = make_clip()
    cache = tmp_path / "cache"
    extract_features(clip, ImageFolderSource(folder), cache_dir=cache, progress=False)
    assert clip.calls == 1
    target = folder / "c0" / "0.png"
    st = os.stat(target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000))
    extract_features(clip, ImageFolderSource(folder), cache_dir=cache, progress=False)
    assert clip.calls == 2
    write_image(folder / "c1" / "7.png", (1, 1, 1))
    added = extract_features(clip, ImageFolderSource(folder), cache_dir=cache, progress=False)
    assert clip.calls == 3 and len(added.features) == 7
    (folder / "c1" / "7.png").unlink()
    extract_features(clip, ImageFolderSource(folder), cache_dir=cache, progress=False)
    assert clip.calls == 3  # back to the touched state, which is cached
    (folder / "c1" / "5.png").unlink()
    removed = extract_features(clip, ImageFolderSource(folder), cache_dir=cache, progress=False)
    assert clip.calls == 4 and len(removed.features) == 5


def test_model_and_preprocess_are_part_of_the_key(folder: Path, make_clip) -> None:
    src = ImageFolderSource(folder)
    a, b = make_clip("weights-a"), make_clip("weights-b")
    assert cache_key(a, src) != cache_key(b, src)
    c = make_clip("weights-a")
    c.preprocess.transforms[0].size = 5
    assert cache_key(a, src) != cache_key(c, src)
    assert cache_key(a, src) == cache_key(make_clip("weights-a"), ImageFolderSource(folder))


def test_key_ignores_memory_addresses_in_the_preprocess_repr(folder: Path, make_clip) -> None:
    def make_fn():
        def to_tensor(image):
            return make_clip().preprocess(image)

        return to_tensor

    a, b = make_clip(), make_clip()
    a.preprocess, b.preprocess = make_fn(), make_fn()
    assert repr(a.preprocess) != repr(b.preprocess)  # different addresses
    assert cache_key(a, ImageFolderSource(folder)) == cache_key(b, ImageFolderSource(folder))


def test_no_partial_entry_after_a_failure_mid_write(folder: Path, tmp_path: Path, make_clip, monkeypatch) -> None:
    cache = tmp_path / "cache"

    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a safetensors file")
        raise OSError("disk full")

    monkeypatch.setattr(integrity_mod, "save_file", broken_save)
    with pytest.raises(OSError, match=r"cannot write .*\.safetensors: disk full"):
        extract_features(make_clip(), ImageFolderSource(folder), cache_dir=cache, progress=False)
    assert list(cache.iterdir()) == []  # no entry and no temporary file left behind
    monkeypatch.undo()
    clip = make_clip()
    extract_features(clip, ImageFolderSource(folder), cache_dir=cache, progress=False)
    extract_features(clip, ImageFolderSource(folder), cache_dir=cache, progress=False)
    assert clip.calls == 1


def test_unreadable_cache_entry_is_rebuilt(folder: Path, tmp_path: Path, make_clip) -> None:
    clip = make_clip()
    cache = tmp_path / "cache"
    first = extract_features(clip, ImageFolderSource(folder), cache_dir=cache, progress=False)
    next(cache.glob("*.safetensors")).write_bytes(b"corrupt")
    with pytest.warns(UserWarning, match="ignoring unreadable feature cache entry"):
        again = extract_features(clip, ImageFolderSource(folder), cache_dir=cache, progress=False)
    assert clip.calls == 2 and torch.equal(first.features, again.features)
    extract_features(clip, ImageFolderSource(folder), cache_dir=cache, progress=False)
    assert clip.calls == 2  # the rebuilt entry is used


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_image_is_skipped_and_recorded(folder: Path, tmp_path: Path, make_clip, num_workers: int,
                                                color_of, expected_features) -> None:
    bad = folder / "c1" / "3.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    src = ImageFolderSource(folder)
    bad_index = [Path(src.describe(i)) for i in range(len(src))].index(bad.resolve())
    clip = make_clip()
    with pytest.warns(UserWarning, match=r"skipped 1 of 6 unreadable images \(first: .*3.png\)"):
        feats = extract_features(clip, src, batch_size=2, cache_dir=tmp_path / "cache", progress=False,
                                 num_workers=num_workers)
    good = [i for i in range(6) if i != bad_index]
    assert feats.kept.tolist() == good
    assert feats.skipped == [str(bad.resolve())]
    assert feats.labels.tolist() == src.labels[good].tolist()
    colors = _colors_in_order(src, color_of)
    torch.testing.assert_close(feats.features, expected_features([colors[i] for i in good]))
    with pytest.warns(UserWarning, match="skipped 1 of 6"):
        hit = extract_features(clip, ImageFolderSource(folder), cache_dir=tmp_path / "cache", progress=False)
    assert clip.calls == 3 and hit.skipped == feats.skipped and torch.equal(hit.kept, feats.kept)
    with pytest.raises(BadImageError, match=r"cannot read image .*3.png: recorded as unreadable"):
        extract_features(clip, ImageFolderSource(folder), cache_dir=tmp_path / "cache", on_error="fail")


def test_fail_policy_raises_with_the_path(folder: Path, make_clip) -> None:
    (folder / "c0" / "0.png").write_bytes(b"not an image")
    with pytest.raises(BadImageError, match=r"cannot read image .*c0/0.png"):
        extract_features(make_clip(), ImageFolderSource(folder), on_error="fail", use_cache=False, progress=False)


def test_no_readable_images_and_bad_arguments(folder: Path, make_clip) -> None:
    for p in folder.rglob("*.png"):
        p.write_bytes(b"junk")
    src = ImageFolderSource(folder)
    with (
        pytest.warns(UserWarning, match="skipped 6 of 6"),
        pytest.raises(DataError, match="no readable images among 6"),
    ):
        extract_features(make_clip(), src, use_cache=False, progress=False)
    with pytest.raises(DataError, match="the image source is empty"):
        extract_features(make_clip(), Subset(src, []), use_cache=False, progress=False)
    with pytest.raises(ValueError, match="on_error must be 'skip' or 'fail'"):
        extract_features(make_clip(), src, on_error="ignore", use_cache=False)


def test_encoder_output_shape_is_checked(folder: Path, make_clip) -> None:
    clip = make_clip()
    clip.encode_images = lambda x: x  # [B,3,H,W], not [B,E]
    with pytest.raises(ValueError, match=r"fake-clip.encode_images returned shape \[6, 3, 4, 4\]"):
        extract_features(clip, ImageFolderSource(folder), use_cache=False, progress=False)


def test_default_dir_from_env_and_use_cache_false(folder: Path, tmp_path: Path, make_clip, monkeypatch) -> None:
    monkeypatch.setenv("PROMPTKIT_CACHE", str(tmp_path / "envcache"))
    extract_features(make_clip(), ImageFolderSource(folder), progress=False)
    assert len(list((tmp_path / "envcache").glob("*.safetensors"))) == 1
    monkeypatch.setenv("PROMPTKIT_CACHE", str(tmp_path / "unused"))
    extract_features(make_clip(), ImageFolderSource(folder), progress=False, use_cache=False)
    assert not (tmp_path / "unused").exists()


def test_embedded_source_features(tmp_path: Path, make_clip, write_embedded) -> None:
    arrays = write_embedded(tmp_path / "assets")
    src = EmbeddedSource("test", asset_dir=tmp_path / "assets")
    clip = make_clip()
    clip.preprocess.transforms[:2] = []  # keep 28x28 so the mean is exact
    feats = extract_features(clip, src, cache_dir=tmp_path / "cache", progress=False)
    gray = torch.from_numpy(arrays["test_images"]).float().div(255).mean(dim=(1, 2))
    torch.testing.assert_close(feats.features, 2 * gray[:, None].expand(-1, 3))
    assert feats.labels.tolist() == arrays["test_labels"].tolist()


class FakeWords:
    """A text encoder whose feature of a text is (its length, 1); ``calls`` counts ``encode_texts`` calls."""

    fingerprint = "fake-words-v1"
    embed_dim = 2

    def __init__(self) -> None:
        self.calls = 0

    def encode_texts(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        self.calls += 1
        return torch.tensor([[float(len(t)), 1.0] for t in texts])


def test_feature_and_word_entries_share_one_layout(folder: Path, tmp_path: Path, make_clip) -> None:
    cache = tmp_path / "cache"
    clip, words = make_clip(), FakeWords()
    source = ImageFolderSource(folder)
    extract_features(clip, source, cache_dir=cache, progress=False)
    embed_words(words, ["red", "blue"], "a {} photo", cache, progress=False)
    entries = [feature_entry(clip, source, cache), text_cache_entry(words, "a {} photo", ["red", "blue"], cache)]
    assert [e.kind for e in entries] == [FEATURE_KIND, TEXT_KIND]
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        f"{e.kind}-{e.key}{suffix}" for e in entries for suffix in (".json", ".safetensors"))
    for entry in entries:
        index = json.loads(entry.index_path.read_text())
        assert {index["kind"], index["key"], index["format"]} == {entry.kind, entry.key, 3}
        assert ": " in index["source"] and index["fingerprint"] in (clip.fingerprint, words.fingerprint)
        assert load_tensors(entry.tensors_path)[1]["key"] == entry.key  # checksummed, tagged with its key
    assert entry_key("text", "a") != entry_key("feature", "a")  # kinds never share a key


def test_word_embeddings_are_a_file_read_and_a_corrupt_entry_is_rebuilt(tmp_path: Path) -> None:
    words = FakeWords()
    first = embed_words(words, ["red", "blue"], "a {} photo", tmp_path, progress=False)
    torch.testing.assert_close(first, torch.nn.functional.normalize(torch.tensor([[11.0, 1.0], [12.0, 1.0]]), dim=-1))
    assert torch.equal(embed_words(words, ["red", "blue"], "a {} photo", tmp_path, progress=False), first)
    assert words.calls == 1
    entry = text_cache_entry(words, "a {} photo", ["red", "blue"], tmp_path)
    flip_tensor_byte(entry.tensors_path, "features", 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = embed_words(words, ["red", "blue"], "a {} photo", tmp_path, progress=False)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and messages[0].startswith(f"ignoring unreadable text cache entry {entry.index_path}")
    assert "checksum mismatch" in messages[0] and messages[0].endswith("rebuilding it")
    assert words.calls == 2 and torch.equal(again, first)
    embed_words(words, ["red", "blue"], "a {} photo", tmp_path, progress=False)
    assert words.calls == 2  # the rebuilt entry is intact


def test_an_intact_file_of_another_entry_is_not_used(tmp_path: Path) -> None:
    words = FakeWords()
    red = embed_words(words, ["red"], "a {}", tmp_path, progress=False)
    embed_words(words, ["blue"], "a {}", tmp_path, progress=False)
    entries = {w: text_cache_entry(words, "a {}", [w], tmp_path) for w in ("red", "blue")}
    entries["red"].tensors_path.write_bytes(entries["blue"].tensors_path.read_bytes())
    with pytest.warns(UserWarning, match=r"ignoring unreadable text cache entry .*belongs to another entry"):
        again = embed_words(words, ["red"], "a {}", tmp_path, progress=False)
    assert words.calls == 3 and torch.equal(again, red)
