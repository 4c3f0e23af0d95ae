"""Reliability of the data layer: checksummed cache files, file modes under the umask, atomic output folders,
directory walks through symlink loops, high-bit-depth images, list-file labels and unusable feature rows."""

from __future__ import annotations

import os
import stat
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from promptkit.data import DataError, ImageFolderSource, ListFileSource, extract_features
from promptkit.data.atomic import OutputError, atomic_dir, atomic_write, current_umask
from promptkit.data.integrity import IntegrityError, load_tensors, save_tensors
from promptkit.data.sources import to_rgb
from promptkit.errors import UserError

from ..integrity_helpers import flip_tensor_byte


@pytest.fixture
def umask():
    """Set the process umask for a test (``umask(0o077)``), restoring the previous one afterwards."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield os.umask
    os.umask(previous)


@pytest.fixture
def folder(solid_folder) -> Path:
    """Two classes of five solid-colour images."""
    return solid_folder(10)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- checksums ----------------------------------------------------------------------------------------

def test_tensor_file_round_trip_and_corruption(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    tensors = {"b": torch.arange(6, dtype=torch.int64), "a": torch.randn(2, 3)}
    digest = save_tensors(path, tensors, metadata={"key": "k"})
    loaded, meta = load_tensors(path)
    assert meta["key"] == "k" and meta["sha256"] == digest
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    flip_tensor_byte(path, "a", 5)
    with pytest.raises(IntegrityError, match=r"t.safetensors: checksum mismatch, the file is corrupt"):
        load_tensors(path)
    save_file(tensors, str(path))  # a file from before checksums
    with pytest.raises(IntegrityError, match="no checksum recorded"):
        load_tensors(path)


@pytest.mark.parametrize("tensor", ["features", "kept", "labels"])
def test_corrupt_cache_entry_is_rebuilt_with_one_warning(folder: Path, tmp_path: Path, make_clip,
                                                         tensor: str) -> None:
    clip, cache = make_clip(), tmp_path / "cache"
    first = extract_features(clip, ImageFolderSource(folder), cache_dir=cache, progress=False)
    flip_tensor_byte(next(cache.glob("*.safetensors")), tensor, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = extract_features(clip, ImageFolderSource(folder), cache_dir=cache, progress=False)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "checksum mismatch" in messages[0] and "rebuilding it" in messages[0], messages
    assert "\n" not in messages[0]
    assert clip.calls == 2
    for name in ("features", "labels", "kept"):
        assert torch.equal(getattr(first, name), getattr(again, name))
    extract_features(clip, ImageFolderSource(folder), cache_dir=cache, progress=False)
    assert clip.calls == 2  # the rebuilt entry is intact


def test_corrupt_shard_alone_is_rebuilt(folder: Path, tmp_path: Path, make_clip) -> None:
    clip, cache = make_clip(), tmp_path / "cache"
    first = extract_features(clip, ImageFolderSource(folder), batch_size=2, cache_dir=cache, progress=False,
                             shard_size=4)
    assert clip.calls == 5  # shards of 4, 4 and 2 images in batches of 2
    shard = sorted(cache.glob("*.shards/*.safetensors"))[1]
    flip_tensor_byte(shard, "features", 0)
    with pytest.warns(UserWarning, match=r"rebuilding feature cache shard .*0000000004-0000000008.*checksum mismatch"):
        again = extract_features(clip, ImageFolderSource(folder), batch_size=2, cache_dir=cache, progress=False,
                                 shard_size=4)
    assert clip.calls == 7  # only the damaged shard was encoded again
    assert torch.equal(first.features, again.features) and torch.equal(first.kept, again.kept)


def test_cache_files_without_checksum_are_stale(folder: Path, tmp_path: Path, make_clip) -> None:
    clip, cache = make_clip(), tmp_path / "cache"
    extract_features(clip, ImageFolderSource(folder), batch_size=2, cache_dir=cache, progress=False, shard_size=4)
    shard = sorted(cache.glob("*.shards/*.safetensors"))[0]
    save_file(load_file(str(shard)), str(shard), metadata={"key": next(cache.glob("*.json")).stem, "skipped": "[]"})
    with pytest.warns(UserWarning, match="no checksum recorded"):
        extract_features(clip, ImageFolderSource(folder), batch_size=2, cache_dir=cache, progress=False,
                         shard_size=4)
    assert clip.calls == 5 + 2


@pytest.mark.parametrize("bad", ["zero", "nan", "inf", "huge"])
def test_feature_rows_that_cannot_be_normalised_are_refused(folder: Path, tmp_path: Path, make_clip,
                                                            bad: str) -> None:
    clip = make_clip()
    encode = clip.encode_images

    def broken(x: torch.Tensor) -> torch.Tensor:
        out = encode(x)
        out[1] = {"zero": 0.0, "nan": float("nan"), "inf": float("inf"), "huge": 1e37}[bad]
        return out

    clip.encode_images = broken
    src = ImageFolderSource(folder)
    with pytest.raises(DataError, match=rf"fake-clip returned image features that are all zero or not finite for 1 "
                                        rf"of the 4 images of a batch \(first: {src.describe(1)}\)"):
        extract_features(clip, src, batch_size=4, cache_dir=tmp_path / "cache", progress=False)
    assert not list((tmp_path / "cache").glob("*"))  # nothing cached


# -- file modes and atomic folders ----------------------------------------------------------------------

@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_written_files_honour_the_umask(tmp_path: Path, umask, folder: Path, make_clip, mask: int,
                                        file_mode: int, dir_mode: int) -> None:
    umask(mask)
    assert current_umask() == mask
    save_tensors(tmp_path / "t.safetensors", {"x": torch.zeros(2)})
    with atomic_write(tmp_path / "t.txt") as tmp:
        tmp.write_text("hello")
    with atomic_dir(tmp_path / "run") as staging:
        save_tensors(staging / "p.safetensors", {"x": torch.zeros(2)})
    extract_features(make_clip(), ImageFolderSource(folder), cache_dir=tmp_path / "cache", progress=False,
                     shard_size=4)
    written = [tmp_path / "t.safetensors", tmp_path / "t.txt", tmp_path / "run" / "p.safetensors",
               *(tmp_path / "cache").rglob("*.*")]
    assert {p.name: _mode(p) for p in written if p.is_file()} == {p.name: file_mode for p in written if p.is_file()}
    assert _mode(tmp_path / "run") == dir_mode


def test_atomic_dir_leaves_nothing_on_failure_and_keeps_other_files(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(run) as staging:
        (staging / "a.txt").write_text("new")
        raise RuntimeError("boom")
    assert not run.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(run) as staging:
        (staging / "a.txt").write_text("first")
        (staging / "b.txt").write_text("first")
    with pytest.raises(RuntimeError), atomic_dir(run) as staging:
        (staging / "a.txt").write_text("second")
        raise RuntimeError
    assert sorted(p.name for p in run.iterdir()) == ["a.txt", "b.txt"] and (run / "a.txt").read_text() == "first"
    (run / "notes.txt").write_text("mine")
    with atomic_dir(run) as staging:
        (staging / "a.txt").write_text("second")
    assert {p.name: p.read_text() for p in run.iterdir()} == {"a.txt": "second", "b.txt": "first",
                                                              "notes.txt": "mine"}


def test_unwritable_output_is_one_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    for target in (blocker, blocker / "run"):
        with pytest.raises(OutputError, match=rf"cannot write {blocker}") as info, atomic_dir(target):
            pass
        assert isinstance(info.value, UserError) and isinstance(info.value, OSError)
        assert "\n" not in str(info.value)
    with pytest.raises(OutputError, match=rf"cannot write .*file.txt/x.json: {blocker} is a file, not a folder"):
        with atomic_write(blocker / "x.json") as tmp:
            tmp.write_text("{}")


# -- directory walks -------------------------------------------------------------------------------------

def test_symlink_loops_end_and_count_each_image_once(tmp_path: Path, write_image, color_of) -> None:
    root = tmp_path / "pool"
    for i, rel in enumerate(["a.png", "sub/b.png", "sub/deeper/c.png"]):
        write_image(root / rel, color_of(i))
    (root / "up").symlink_to("..")
    (root / "again").symlink_to(".")
    (root / "sub" / "back").symlink_to("..")
    (root / "sub" / "deeper" / "top").symlink_to("../../..")
    (root / "x.png").symlink_to("x.png")  # a link to itself
    (root / "broken.png").symlink_to("nowhere.png")
    (root / "same.png").symlink_to("a.png")
    start = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        src = ImageFolderSource(root, labelled=False)
    assert time.monotonic() - start < 5
    assert sorted(Path(src.describe(i)).relative_to(root.resolve()).as_posix() for i in range(len(src))) == [
        "a.png", "sub/b.png", "sub/deeper/c.png"]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert messages[0].startswith("skipped 7 broken or looping links, repeated files or folders")
    assert f"under {root.resolve()} (first: {root.resolve() / 'again'})" in messages[0]


def test_class_folders_that_loop_are_not_classes(tmp_path: Path, write_image, color_of) -> None:
    root = tmp_path / "tree"
    write_image(root / "cat" / "0.png", color_of(1))
    write_image(root / "dog" / "0.png", color_of(2))
    (root / "again").symlink_to(".")
    (root / "up").symlink_to("..")
    (root / "self").symlink_to("self")
    (root / "cat" / "dogs").symlink_to("../dog")  # a class inside another: dog's images stay dog's
    with pytest.warns(UserWarning, match="skipped 4 broken or looping links"):
        src = ImageFolderSource(root)
    assert src.class_names == ["cat", "dog"] and src.labels.tolist() == [0, 1]


# -- images and list files -------------------------------------------------------------------------------

def _gray() -> np.ndarray:
    return (np.arange(32 * 32).reshape(32, 32) * 7 % 256).astype(np.uint8)


@pytest.mark.parametrize(("name", "array", "mode"), [
    ("16.png", _gray().astype(np.uint16) * 257, "I;16"),
    ("16b.tif", (_gray().astype(np.uint16) * 257).astype(">u2"), "I;16B"),
    ("32.tif", _gray().astype(np.int32) * 257, "I"),
    ("float.tif", _gray().astype(np.float32) / 255, "F"),
])
def test_high_bit_depth_images_are_scaled_not_clipped(tmp_path: Path, make_clip, name: str, array: np.ndarray,
                                                      mode: str) -> None:
    Image.fromarray(_gray()).save(tmp_path / "8.png")
    Image.fromarray(array).save(tmp_path / name)
    with Image.open(tmp_path / name) as opened:
        assert opened.mode == mode
    src = ImageFolderSource(tmp_path)
    by_name = {Path(src.describe(i)).name: src.load(i) for i in range(len(src))}
    eight, high = np.asarray(by_name["8.png"]), np.asarray(by_name[name])
    assert high.dtype == np.uint8 and np.abs(eight.astype(int) - high.astype(int)).max() <= 1
    preprocess = make_clip().preprocess
    torch.testing.assert_close(preprocess(by_name[name]), preprocess(by_name["8.png"]), atol=1 / 255, rtol=0)


def test_16_bit_shifted_copy_is_within_one_level() -> None:
    shifted = Image.fromarray(_gray().astype(np.uint16) << 8)  # tools that widen by a shift, not by 257
    assert np.abs(np.asarray(to_rgb(shifted))[..., 0].astype(int) - _gray()).max() <= 1


@pytest.mark.parametrize("label", ["cat", "1.5", "0x1"])
def test_list_file_label_must_be_an_integer(tmp_path: Path, write_image, color_of, label: str) -> None:
    write_image(tmp_path / "a.png", color_of(1))
    write_image(tmp_path / "img.png", color_of(2))
    lst = tmp_path / "list.txt"
    lst.write_text(f"a.png 0\nimg.png {label}\n")
    with pytest.raises(DataError, match=rf"list.txt:2: label '{label}' is not an integer"):
        ListFileSource(lst, class_names=["a"])


def test_list_file_paths_with_spaces_still_need_no_label(tmp_path: Path, write_image, color_of) -> None:
    write_image(tmp_path / "my photos" / "a b.png", color_of(1))
    write_image(tmp_path / "x.png cat.png", color_of(2))
    lst = tmp_path / "list.txt"
    lst.write_text("my photos/a b.png\nx.png cat.png 0\n")
    src = ListFileSource(lst, class_names=["cat"])
    assert src.labels.tolist() == [-1, 0] and Path(src.describe(1)).name == "x.png cat.png"
