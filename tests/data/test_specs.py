from __future__ import annotations

from pathlib import Path

import pytest

from promptkit.data import DataError, benchmark_spec, class_names, class_wnids, resolve


@pytest.fixture
def data_root(tmp_path: Path, write_image) -> Path:
    """The MOS layout with one image per ImageNet-10 and ImageNet-20 class and per OOD folder."""
    root = tmp_path / "datasets"
    for wnid in class_wnids("imagenet10") + class_wnids("imagenet20"):
        write_image(root / "imagenet" / "val" / wnid / f"{wnid}_0.png", (1, 2, 3))
    write_image(root / "imagenet" / "val" / class_wnids("imagenet10")[0] / "second.png", (1, 2, 3))
    for i, folder in enumerate(["iNaturalist/images", "SUN/images", "Places/images", "dtd/images/banded"]):
        for j in range(i + 1):
            write_image(root / folder / f"{j}.png", (4, 5, 6))
    return root


def test_spec_fields() -> None:
    spec = benchmark_spec("ImageNet-100")
    assert spec.name == "imagenet100"
    assert spec.id_classes == class_names("imagenet100") and spec.id_wnids == class_wnids("imagenet100")
    assert spec.ood == {"iNaturalist": "iNaturalist", "SUN": "SUN", "Places": "Places", "Textures": "dtd/images"}
    assert benchmark_spec("imagenet10").ood_names == ["iNaturalist", "SUN", "Places", "Textures", "ImageNet-20"]


def test_resolve_imagenet10(data_root: Path) -> None:
    id_src, ood = resolve("imagenet10", data_root)
    assert id_src.class_names == class_names("imagenet10")
    assert id_src.labels.tolist() == [0, 0, *range(1, 10)]  # sorted wnids, the first class has 2 images
    assert Path(id_src.describe(0)).parent.name == class_wnids("imagenet10")[0]
    assert {k: len(v) for k, v in ood.items()} == {"iNaturalist": 1, "SUN": 2, "Places": 3, "Textures": 4,
                                                   "ImageNet-20": 20}
    assert all((s.labels == -1).all() and s.class_names == [] for s in ood.values())


def test_resolve_selection_and_id_root(data_root: Path, tmp_path: Path) -> None:
    moved = tmp_path / "val_elsewhere"
    (data_root / "imagenet" / "val").rename(moved)
    id_src, ood = resolve("imagenet20", data_root, id_root=moved, ood_names=["SUN", "ImageNet-10"])
    assert len(id_src) == 20 and list(ood) == ["SUN", "ImageNet-10"] and len(ood["ImageNet-10"]) == 11


def test_resolve_errors(data_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data root not found"):
        resolve("imagenet10", tmp_path / "none")
    with pytest.raises(DataError, match=r"class folders missing under .*val"):
        resolve("imagenet100", data_root, ood_names=[])
    with pytest.raises(ValueError, match="has no OOD set 'ImageNet-O'"):
        resolve("imagenet10", data_root, ood_names=["ImageNet-O"])
    (data_root / "SUN").rename(data_root / "sun_moved")
    with pytest.raises(DataError, match=r"OOD folders not found under .*: SUN \(.*SUN\)"):
        resolve("imagenet1k", data_root)
    (data_root / "imagenet" / "val").rename(data_root / "val_moved")
    with pytest.raises(DataError, match="imagenet10 ID images not found: .*imagenet/val .*pass id_root="):
        resolve("imagenet10", data_root)
