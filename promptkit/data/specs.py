"""Benchmark specs: the standard ImageNet OOD protocols, resolved against the user's data root.

Expected layout under ``data_root`` (the MOS / MCM layout):

    imagenet/val/<wnid>/*.JPEG     ILSVRC-2012 val, one folder per wnid (or pass ``id_root``)
    iNaturalist/  SUN/  Places/    the MOS OOD subsets (any folder depth below)
    dtd/images/<class>/*.jpg       Textures

ImageNet-100/10/20 read their classes' folders from the same ImageNet-1k val folder. The MCM hard pair also
uses ImageNet-20 as an OOD set of ImageNet-10 and the other way round.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from promptkit.data.classnames import class_names, class_wnids, normalize_benchmark
from promptkit.data.errors import DataError
from promptkit.data.sources import ImageFolderSource, ImageSource
from promptkit.errors import ConfigError

MOS_OOD = {"iNaturalist": "iNaturalist", "SUN": "SUN", "Places": "Places", "Textures": "dtd/images"}
IMAGENET_VAL = "imagenet/val"


@dataclass(frozen=True)
class BenchmarkSpec:
    """One ID/OOD protocol.

    Attributes:
        name: canonical name (``imagenet1k``, ``imagenet100``, ``imagenet10``, ``imagenet20``).
        id_classes: ID class names in label order.
        id_dir: folder of the ID test images, relative to the data root, one subfolder per wnid.
        ood: OOD set name -> folder relative to the data root (every image below it is OOD).
        id_wnids: the ID class subfolders in label order (sorted wnids).
        ood_classes: OOD set name -> benchmark whose class folders inside ``id_dir`` form that OOD set.
    """

    name: str
    id_classes: list[str]
    id_dir: str
    ood: dict[str, str]
    id_wnids: list[str] = field(default_factory=list)
    ood_classes: dict[str, str] = field(default_factory=dict)

    @property
    def ood_names(self) -> list[str]:
        """Every OOD set of this protocol, folder-based ones first."""
        return [*self.ood, *self.ood_classes]


_HARD_PAIR = {"imagenet10": {"ImageNet-20": "imagenet20"}, "imagenet20": {"ImageNet-10": "imagenet10"}}


def benchmark_spec(name: str) -> BenchmarkSpec:
    """The spec of benchmark ``name``: imagenet1k / imagenet100 / imagenet10 / imagenet20 (any case, dashes allowed)."""
    key = normalize_benchmark(name)
    return BenchmarkSpec(
        name=key,
        id_classes=class_names(key),
        id_dir=IMAGENET_VAL,
        ood=dict(MOS_OOD),
        id_wnids=class_wnids(key),
        ood_classes=dict(_HARD_PAIR.get(key, {})),
    )


def resolve(
    spec_name: str,
    data_root: str | os.PathLike[str],
    *,
    id_root: str | os.PathLike[str] | None = None,
    ood_names: list[str] | None = None,
) -> tuple[ImageSource, dict[str, ImageSource]]:
    """Open a benchmark's ID test set and OOD sets under ``data_root``.

    Args:
        spec_name: benchmark name, see ``benchmark_spec``.
        data_root: folder holding the layout in this module's docstring.
        id_root: the ImageNet val folder (one subfolder per wnid) when it is not ``data_root/imagenet/val``.
        ood_names: which OOD sets to open (default: all of the spec's).

    Returns:
        (ID source labelled in the spec's class order, {OOD name: unlabelled source}).
    """
    spec = benchmark_spec(spec_name)
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise DataError(f"data root not found: {data_root}")
    id_folder = Path(id_root).expanduser() if id_root is not None else root / spec.id_dir
    if not id_folder.is_dir():
        raise DataError(f"{spec.name} ID images not found: {id_folder} (expected ImageNet val in one folder per wnid, "
                        "e.g. n01440764/; pass id_root= to point elsewhere)")
    wanted = spec.ood_names if ood_names is None else list(ood_names)
    unknown = [n for n in wanted if n not in spec.ood_names]
    if unknown:
        raise ConfigError(f"{spec.name} has no OOD set {unknown[0]!r}; known: {', '.join(spec.ood_names)}")
    missing = [f"{n} ({root / spec.ood[n]})" for n in wanted if n in spec.ood and not (root / spec.ood[n]).is_dir()]
    if missing:
        raise DataError(f"{spec.name} OOD folders not found under {root}: {'; '.join(missing)}")

    id_source = ImageFolderSource(id_folder, classes=spec.id_wnids, class_names=spec.id_classes)
    ood: dict[str, ImageSource] = {}
    for n in wanted:
        if n in spec.ood:
            ood[n] = ImageFolderSource(root / spec.ood[n], labelled=False)
        else:
            ood[n] = ImageFolderSource(id_folder, classes=class_wnids(spec.ood_classes[n]), labelled=False)
    return id_source, ood
