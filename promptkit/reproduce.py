"""Paper-table reproduction: run a method under its paper's protocol and compare with the published numbers.

A protocol (``promptkit/data/reference_results.json``) fixes the method, backbone and weights, shots, seeds,
class list, OOD sets and FPR convention, and holds the paper's numbers with their source. Data roots follow the
layout of ``promptkit.data.specs`` plus, where a protocol needs more:

    imagenet/train/<wnid>/*.JPEG        few-shot training images (LSN, NegPrompt)
    openood/ssb_hard/ openood/ninco/    OpenOOD v1.5 near-OOD sets (any depth below)
    openood/inaturalist/ openood/textures/ openood/openimage_o/    OpenOOD v1.5 far-OOD sets
    cifar10/train/<class>/ cifar10/test/<class>/  CIFAR-10 as image folders, classes in CIFAR's label order
    cifar10/splits.json                 the 5 lists of 6 known class indices the paper used (LSN follows ZOC;
                                        not shipped: promptkit could not verify them), split i for seed i

``embedded-<method>`` protocols run on the embedded default and compare with promptkit's own README table,
measured with the same settings, so they show that a run reproduces the recorded numbers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from promptkit.data.classnames import class_names, class_wnids
from promptkit.data.errors import DataError
from promptkit.data.sources import ImageFolderSource, ImageSource
from promptkit.data.specs import resolve
from promptkit.errors import ConfigError
from promptkit.eval.report import write_json_and_table

REFERENCE_FILE = Path(__file__).parent / "data" / "reference_results.json"
OPENOOD_SETS = {"openood-near": {"SSB-hard": "openood/ssb_hard", "NINCO": "openood/ninco"},
                "openood-far": {"iNaturalist": "openood/inaturalist", "Textures": "openood/textures",
                                "OpenImage-O": "openood/openimage_o"}}


@dataclass(frozen=True)
class Protocol:
    """One paper table row: what to run and the numbers to compare with (FPR95, AUROC in % per OOD set)."""

    name: str
    method: str
    benchmark: str
    model: str
    pretrained: str | None
    seeds: list[int]
    fpr_positive: str
    source: str
    confidence: str
    reference: dict[str, list[float]]
    shots: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    train: str | None = None  # training images under the data root
    pool: str | None = None  # LAPT's retrieval pool under the data root


def protocols() -> dict[str, Protocol]:
    """Every protocol of the reference file, by name."""
    data = json.loads(REFERENCE_FILE.read_text())["protocols"]
    return {name: Protocol(name=name, **spec) for name, spec in data.items()}


def get_protocol(name: str) -> Protocol:
    """The protocol ``name``; an unknown name is a ConfigError listing the known ones."""
    known = protocols()
    if name not in known:
        raise ConfigError(f"unknown protocol {name!r}; known: {', '.join(sorted(known))}")
    return known[name]


def _folder(root: Path, relative: str, what: str) -> Path:
    path = root / relative
    if not path.is_dir():
        raise DataError(f"{what} not found: {path} (see `promptkit reproduce --help` for the expected layout)")
    return path


def protocol_data(protocol: Protocol, data_root: str | None, pool: str | None = None):
    """The protocol's ``pipeline.Datasets`` under ``data_root`` (None only for the embedded protocols)."""
    from promptkit.pipeline import Datasets, embedded_datasets

    if protocol.benchmark == "embedded":
        return embedded_datasets()
    if not data_root:
        raise ConfigError(f"protocol {protocol.name} needs --data-root DIR")
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise DataError(f"data root not found: {data_root}")
    train: ImageSource | None = None
    if protocol.benchmark in ("imagenet1k", "imagenet100", "imagenet10", "imagenet20"):
        id_source, ood = resolve(protocol.benchmark, root)
        names, wnids = class_names(protocol.benchmark), class_wnids(protocol.benchmark)
    elif protocol.benchmark == "imagenet-split4":  # NegPrompt's Split-4: classes 0-99 ID, 100-999 OOD
        val = _folder(root, "imagenet/val", "ImageNet val (one folder per wnid)")
        all_names, all_wnids = class_names("imagenet1k"), class_wnids("imagenet1k")
        names, wnids = all_names[:100], all_wnids[:100]
        id_source = ImageFolderSource(val, classes=wnids, class_names=names)
        ood = {"ImageNet-900": ImageFolderSource(val, classes=all_wnids[100:], labelled=False)}
    elif protocol.benchmark in OPENOOD_SETS:
        id_source, _ = resolve("imagenet1k", root, ood_names=[])
        names, wnids = class_names("imagenet1k"), class_wnids("imagenet1k")
        ood = {name: ImageFolderSource(_folder(root, rel, f"OpenOOD set {name}"), labelled=False)
               for name, rel in OPENOOD_SETS[protocol.benchmark].items()}
    else:
        raise ConfigError(f"protocol {protocol.name}: benchmark {protocol.benchmark!r} is run per split by "
                          "`reproduce` itself")
    if protocol.train:
        train = ImageFolderSource(_folder(root, protocol.train, "training images"), classes=wnids, class_names=names)
    data = Datasets(names, id_source, ood, train, f"{protocol.name} under {root}")
    if protocol.pool:
        data.pool = pool or str(_folder(root, protocol.pool, "LAPT retrieval pool (or pass --pool)"))
    return data


def cifar_split_data(root: Path, split: list[int]):
    """CIFAR-10 6/4: the 6 known classes' test images as ID (train images for training), the other 4 as OOD."""
    from promptkit.pipeline import Datasets

    test, train = _folder(root, "cifar10/test", "CIFAR-10 test folders"), _folder(root, "cifar10/train",
                                                                                   "CIFAR-10 train folders")
    classes = sorted(p.name for p in test.iterdir() if p.is_dir())
    if len(classes) != 10 or len(set(split)) != 6 or not all(0 <= i < 10 for i in split):
        raise DataError(f"{root}/cifar10: expected 10 class folders and splits of 6 distinct indices, got "
                        f"{len(classes)} folders and split {split}")
    known = [classes[i] for i in split]
    unknown = [c for c in classes if c not in known]
    return Datasets(known, ImageFolderSource(test, classes=known), {"CIFAR-10 unknown": ImageFolderSource(
        test, classes=unknown, labelled=False)}, ImageFolderSource(train, classes=known), f"cifar10 split {split}")


def cifar_splits(root: Path) -> list[list[int]]:
    path = root / "cifar10" / "splits.json"
    if not path.is_file():
        raise DataError(f"{path} not found: give the 5 known-class splits as a JSON list of 6-index lists")
    try:
        splits = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not JSON ({error})") from None
    if not isinstance(splits, list) or not all(isinstance(s, list) for s in splits):
        raise DataError(f"{path}: expected a list of lists of class indices")
    return splits


def check_data(protocol: Protocol, data_root: str | None, pool: str | None = None) -> None:
    """Open the protocol's data once, so that a missing folder is reported before any model is loaded."""
    if protocol.benchmark == "cifar10-6-4":
        root = Path(data_root or ".")
        if not data_root or not root.is_dir():
            raise DataError(f"data root not found: {data_root}")
        cifar_split_data(root, cifar_splits(root)[0])
    else:
        protocol_data(protocol, data_root, pool)


def run_protocol(protocol: Protocol, clip, data_root: str | None, options, seeds: list[int] | None = None,
                 pool: str | None = None) -> list[dict[str, Any]]:
    """Train and evaluate the protocol's method once per seed; returns each run's metrics."""
    from promptkit.pipeline import train_and_evaluate

    runs = []
    for i, seed in enumerate(seeds or protocol.seeds):
        if protocol.benchmark == "cifar10-6-4":
            splits = cifar_splits(Path(data_root or "."))
            data = cifar_split_data(Path(data_root or "."), splits[i % len(splits)])
        else:
            data = protocol_data(protocol, data_root, pool)
        runs.append(train_and_evaluate(protocol.method, clip, data, protocol.shots, seed, dict(protocol.settings),
                                       options).metrics)
    return runs


def comparison(protocol: Protocol, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per OOD set (and "mean"): the paper's FPR95/AUROC, ours (mean over runs, %) and ours minus the paper's."""
    rows = []
    for name, (paper_fpr, paper_auroc) in protocol.reference.items():
        blocks = [run["mean"] if name == "mean" else run["ood"].get(name) for run in runs]
        if any(b is None for b in blocks):
            ours_fpr = ours_auroc = math.nan
        else:
            ours_fpr = 100 * sum(b["fpr95"] for b in blocks) / len(blocks)
            ours_auroc = 100 * sum(b["auroc"] for b in blocks) / len(blocks)
        rows.append({"set": name, "paper_fpr95": paper_fpr, "fpr95": ours_fpr, "delta_fpr95": ours_fpr - paper_fpr,
                     "paper_auroc": paper_auroc, "auroc": ours_auroc, "delta_auroc": ours_auroc - paper_auroc})
    return rows


def comparison_table(protocol: Protocol, rows: list[dict[str, Any]], seeds: int) -> str:
    """The comparison as a Markdown table with its source line."""
    lines = [f"{protocol.name}: {protocol.method} on {protocol.benchmark}, {protocol.model} ({protocol.pretrained}), "
             f"{seeds} seed(s), FPR95 {protocol.fpr_positive}-positive",
             f"reference: {protocol.source} [{protocol.confidence}]", "",
             "| OOD set | FPR95 paper | FPR95 ours | Δ | AUROC paper | AUROC ours | Δ |",
             "|---|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        lines.append(f"| {r['set']} | {r['paper_fpr95']:.2f} | {r['fpr95']:.2f} | {r['delta_fpr95']:+.2f} | "
                     f"{r['paper_auroc']:.2f} | {r['auroc']:.2f} | {r['delta_auroc']:+.2f} |")
    return "\n".join(lines) + "\n"


def save_reproduction(directory: str | Path, protocol: Protocol, runs: list[dict[str, Any]]) -> str:
    """Write ``reproduce.json`` (the comparison and every run) and ``reproduce.md`` into ``directory``, both or
    neither. Returns the Markdown table."""
    rows = comparison(protocol, runs)
    table = comparison_table(protocol, rows, len(runs))
    write_json_and_table(directory, "reproduce", {"protocol": protocol.name, "source": protocol.source,
                                                  "comparison": rows, "runs": runs}, table)
    return table
