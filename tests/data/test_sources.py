from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from promptkit.data import (
    BadImageError,
    DataError,
    EmbeddedSource,
    ImageFolderSource,
    ImageSource,
    ListFileSource,
    Subset,
    embedded_splits,
    open_source,
)


def test_image_folder_labels_follow_sorted_folder_names(class_tree: Path, color_of) -> None:
    src = ImageFolderSource(class_tree)
    assert isinstance(src, ImageSource)
    assert src.class_names == ["a_cat", "b_dog"]
    assert len(src) == 5  # the .txt and the hidden .png are not images of the set
    assert src.labels.dtype == torch.int64
    assert src.labels.tolist() == [0, 0, 1, 1, 1]
    assert src.describe(2) == str((class_tree / "b_dog" / "0.png").resolve())
    img = src.load(0)
    assert img.mode == "RGB" and img.size == (6, 6)
    assert img.getpixel((3, 3)) == color_of(0)


def test_image_folder_reads_nested_files_and_restricts_classes(class_tree: Path, write_image, color_of) -> None:
    write_image(class_tree / "a_cat" / "deeper" / "x.png", color_of(5))
    write_image(class_tree / "c_owl" / "0.png", color_of(6))
    src = ImageFolderSource(class_tree, classes=["c_owl", "a_cat"], class_names=["owl", "cat"])
    assert src.class_names == ["owl", "cat"]
    assert src.labels.tolist() == [0, 1, 1, 1]
    assert src.load(3).getpixel((0, 0)) == color_of(5)


def test_flat_folder_is_unlabelled(tmp_path: Path, write_image, color_of) -> None:
    for i, name in enumerate(["0.png", "1.JPEG", "2.bmp", "3.tif", "4.webp", "5.jpg"]):
        write_image(tmp_path / name, color_of(i))
    (tmp_path / "6.gif").write_bytes(b"GIF89a")
    src = ImageFolderSource(tmp_path)
    assert src.class_names == []
    assert src.labels.tolist() == [-1] * 6
    assert [Path(src.describe(i)).name for i in range(6)] == ["0.png", "1.JPEG", "2.bmp", "3.tif", "4.webp", "5.jpg"]


def test_labelled_false_reads_every_image_below_root(class_tree: Path) -> None:
    src = ImageFolderSource(class_tree, labelled=False)
    assert len(src) == 5
    assert src.labels.tolist() == [-1] * 5
    only_dogs = ImageFolderSource(class_tree, classes=["b_dog"], labelled=False)
    assert len(only_dogs) == 3 and only_dogs.class_names == []


def test_image_folder_errors_name_the_folder(tmp_path: Path, class_tree: Path, write_image) -> None:
    with pytest.raises(DataError, match="image folder not found: .*nowhere"):
        ImageFolderSource(tmp_path / "nowhere")
    write_image(class_tree / "loose.png", (0, 0, 0))
    with pytest.raises(DataError, match="both class subfolders and 1 loose images"):
        ImageFolderSource(class_tree)
    with pytest.raises(DataError, match="class folders missing .*'zebra'"):
        ImageFolderSource(class_tree, classes=["a_cat", "zebra"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        ImageFolderSource(tmp_path / "empty")


def test_empty_class_folder_warns_and_keeps_label_order(class_tree: Path) -> None:
    (class_tree / "aa_empty").mkdir()
    with pytest.warns(UserWarning, match="hold no images, e.g. 'aa_empty'"):
        src = ImageFolderSource(class_tree)
    assert src.class_names == ["a_cat", "aa_empty", "b_dog"]
    assert src.labels.tolist() == [0, 0, 2, 2, 2]


def test_list_file_paths_labels_and_classnames(tmp_path: Path, write_image, color_of) -> None:
    data = tmp_path / "data"
    write_image(data / "x" / "a.png", color_of(1))
    write_image(data / "y" / "b b.png", color_of(2))
    write_image(data / "c.png", color_of(3))
    lst = data / "train.txt"
    lst.write_text("# comment\nx/a.png 1\n\ny/b b.png 0\nc.png\n")
    (data / "classnames.txt").write_text("zero\none\n")
    src = ListFileSource(lst)
    assert src.class_names == ["zero", "one"]
    assert src.labels.tolist() == [1, 0, -1]
    assert src.load(1).getpixel((0, 0)) == color_of(2)
    assert src.describe(2) == str((data / "c.png").resolve())


def test_list_file_root_and_given_names(tmp_path: Path, write_image, color_of) -> None:
    write_image(tmp_path / "imgs" / "a.png", color_of(1))
    lst = tmp_path / "lists" / "l.txt"
    lst.parent.mkdir()
    lst.write_text("a.png 2\n")
    src = ListFileSource(lst, root=tmp_path / "imgs", class_names=["p", "q", "r"])
    assert src.class_names == ["p", "q", "r"] and src.labels.tolist() == [2]
    assert src.load(0).getpixel((0, 0)) == color_of(1)
    with pytest.warns(UserWarning, match="no class names"):
        numbered = ListFileSource(lst, root=tmp_path / "imgs")
    assert numbered.class_names == ["0", "1", "2"]


def test_list_file_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="list file not found: .*missing.txt"):
        ListFileSource(tmp_path / "missing.txt")
    bad = tmp_path / "bad.txt"
    bad.write_text("a.png 0\nb.png -3\n")
    with pytest.raises(DataError, match=r"bad.txt:2: label -3"):
        ListFileSource(bad, class_names=["a"])
    short = tmp_path / "short.txt"
    short.write_text("a.png 4\n")
    with pytest.raises(DataError, match="label 4 has no class name"):
        ListFileSource(short, class_names=["a", "b"])


def test_unreadable_image_raises_bad_image_error_with_path(tmp_path: Path, write_image) -> None:
    good = write_image(tmp_path / "good.png", (9, 9, 9))
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG not really a png")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:40])
    src = ImageFolderSource(tmp_path)
    names = [Path(src.describe(i)).name for i in range(len(src))]
    for bad in ("garbage.png", "truncated.png"):
        with pytest.raises(BadImageError, match=f"cannot read image .*{bad}") as info:
            src.load(names.index(bad))
        assert info.value.path.endswith(bad)
    assert isinstance(BadImageError("p"), ValueError)


def test_file_fingerprint_tracks_paths_sizes_and_mtimes(class_tree: Path, write_image) -> None:
    fp = ImageFolderSource(class_tree).fingerprint()
    assert ImageFolderSource(class_tree).fingerprint() == fp
    target = class_tree / "a_cat" / "0.png"
    st = os.stat(target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    touched = ImageFolderSource(class_tree).fingerprint()
    assert touched != fp
    write_image(class_tree / "a_cat" / "9.png", (0, 0, 0))
    assert ImageFolderSource(class_tree).fingerprint() not in (fp, touched)


def test_embedded_source_splits(tmp_path: Path, write_embedded) -> None:
    arrays = write_embedded(tmp_path)
    train = EmbeddedSource("train", asset_dir=tmp_path)
    assert len(train) == 6 and train.class_names == ["shirt", "bag", "boot"]
    assert train.labels.tolist() == arrays["train_labels"].tolist()
    img = train.load(4)
    assert img.mode == "RGB" and img.size == (28, 28)
    np.testing.assert_array_equal(np.asarray(img)[..., 1], arrays["train_images"][4])
    assert train.describe(4) == "embedded:train[4]"
    ood = EmbeddedSource("fashion-heldout", asset_dir=tmp_path)
    assert len(ood) == 3 and ood.class_names == [] and ood.labels.tolist() == [-1, -1, -1]
    assert list(embedded_splits(tmp_path)) == ["train", "test", "digits", "fashion-heldout"]
    fps = {EmbeddedSource(s, asset_dir=tmp_path).fingerprint() for s in embedded_splits(tmp_path)}
    assert len(fps) == 4
    assert EmbeddedSource("train", asset_dir=tmp_path).fingerprint() == train.fingerprint()


def test_embedded_source_errors(tmp_path: Path, write_embedded) -> None:
    with pytest.raises(DataError, match="embedded image set description not found: .*embedded.json"):
        EmbeddedSource("train", asset_dir=tmp_path)
    arrays = write_embedded(tmp_path)
    with pytest.raises(DataError, match="no embedded split 'val'; available: train, test, digits, fashion-heldout"):
        EmbeddedSource("val", asset_dir=tmp_path)
    del arrays["ood_digits_images"]
    arrays["test_labels"][0] = 3  # there are 3 ID classes
    np.savez(tmp_path / "embedded.npz", **arrays)
    with pytest.raises(DataError, match="has no array 'ood_digits_images' for split 'digits'"):
        EmbeddedSource("digits", asset_dir=tmp_path)
    with pytest.raises(DataError, match=r"test labels must lie in \[0, 3\)"):
        EmbeddedSource("test", asset_dir=tmp_path)


def test_subset(class_tree: Path, color_of) -> None:
    src = ImageFolderSource(class_tree)
    sub = Subset(src, [4, 1])
    assert len(sub) == 2 and sub.labels.tolist() == [1, 0] and sub.class_names == src.class_names
    assert sub.load(0).getpixel((0, 0)) == color_of(12)
    assert sub.describe(1) == src.describe(1)
    assert sub.fingerprint() not in (src.fingerprint(), Subset(src, [1, 4]).fingerprint())
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 5\)"):
        Subset(src, [5])


def test_open_source_dispatch(tmp_path: Path, class_tree: Path, write_embedded) -> None:
    assert isinstance(open_source(str(class_tree)), ImageFolderSource)
    lst = class_tree / "list.txt"
    lst.write_text("a_cat/0.png 0\n")
    (class_tree / "classnames.txt").write_text("cat\n")
    assert isinstance(open_source(lst), ListFileSource)
    write_embedded(tmp_path / "assets")
    emb = open_source("embedded:test", asset_dir=tmp_path / "assets")
    assert isinstance(emb, EmbeddedSource) and len(emb) == 4
    with pytest.raises(DataError, match="no such image folder or list file: .*does/not/exist"):
        open_source(tmp_path / "does" / "not" / "exist")
