from __future__ import annotations

from pathlib import Path

import open_clip.zero_shot_metadata
import pytest

from promptkit.data import DataError, class_names, class_wnids, read_class_names
from promptkit.data.classnames import normalize_benchmark


def test_imagenet1k_is_clips_clean_list_in_sorted_wnid_order() -> None:
    assert class_names("imagenet1k") == list(open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES)
    wnids = class_wnids("imagenet1k")
    assert len(wnids) == 1000 == len(set(wnids))
    assert wnids == sorted(wnids)
    assert wnids[0] == "n01440764" and wnids[-1] == "n15075141"
    names = dict(zip(wnids, class_names("imagenet1k"), strict=True))
    assert names["n01440764"] == "tench" and names["n02123597"] == "Siamese cat"


def test_imagenet100_labels_in_sorted_wnid_order_with_clean_names() -> None:
    wnids = class_wnids("ImageNet-100")
    assert len(wnids) == 100 == len(set(wnids))
    assert wnids == sorted(wnids)
    full = dict(zip(class_wnids("imagenet1k"), class_names("imagenet1k"), strict=True))
    assert class_names("imagenet100") == [full[w] for w in wnids]
    # spot checks against MCM's data/ImageNet100/class_list.txt (first and last entries there)
    assert {"n03877845", "n03594945"} <= set(wnids)
    assert full["n03877845"] == "palace"


def test_imagenet10_and_20_match_the_mcm_hard_pair() -> None:
    # methods.md section 9
    in10 = {"n04552348": "warplane", "n04285008": "sports car", "n01530575": "brambling bird",
            "n02123597": "Siamese cat", "n02422699": "antelope", "n02107574": "swiss mountain dog",
            "n01641577": "bull frog", "n03417042": "garbage truck", "n02389026": "horse",
            "n03095699": "container ship"}
    assert class_wnids("imagenet10") == sorted(in10)
    assert class_names("imagenet10") == [in10[w] for w in sorted(in10)]
    names20 = {"sailboat", "canoe", "balloon", "tank", "missile", "bullet train", "starfish",
               "spotted salamander", "common newt", "eft", "zebra", "green lizard", "African crocodile",
               "Arctic fox", "timber wolf", "brown bear", "moped", "steam locomotive", "space shuttle", "snowmobile"}
    assert set(class_names("imagenet20")) == names20 and len(class_names("imagenet20")) == 20
    assert class_wnids("imagenet20") == sorted(class_wnids("imagenet20"))
    assert set(class_wnids("imagenet20")) <= set(class_wnids("imagenet1k"))
    assert not set(class_wnids("imagenet20")) & set(in10)


def test_read_class_names_formats(tmp_path: Path) -> None:
    f = tmp_path / "names.txt"
    f.write_text("# header\ncat\n\n  big dog  \nn0001\tsea lion\n")
    assert read_class_names(f) == ["cat", "big dog", "sea lion"]
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(DataError, match="lists no classes"):
        read_class_names(tmp_path / "empty.txt")
    with pytest.raises(DataError, match="class-name file not found: .*nope.txt"):
        read_class_names(tmp_path / "nope.txt")


def test_benchmark_names() -> None:
    assert normalize_benchmark("ImageNet") == "imagenet1k"
    assert normalize_benchmark("imagenet_20") == "imagenet20"
    with pytest.raises(ValueError, match="unknown benchmark 'cifar10'; known: imagenet1k"):
        class_names("cifar10")


def test_class_list_reads_a_file_or_a_shipped_benchmark(tmp_path):
    from promptkit.data.classnames import class_list

    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\n")
    assert class_list(names) == ["cat", "dog"]
    assert class_list("ImageNet-10")[0] == class_names("imagenet10")[0]
    with pytest.raises(DataError, match="neither a class-name file nor a known benchmark"):
        class_list(tmp_path / "missing.txt")
