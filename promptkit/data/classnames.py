"""Class-name lists: the ones shipped for the ImageNet benchmarks, and reading a user's file.

Shipped lists live in ``promptkit/data/classnames/<benchmark>.txt``, one class per line as
``<wnid><TAB><name>``, in label order (sorted wnids), with ``#`` comment lines saying where they come from.
"""

from __future__ import annotations

import os
from pathlib import Path

from promptkit.data.errors import DataError
from promptkit.errors import ConfigError

CLASSNAME_DIR = Path(__file__).resolve().parent / "classnames"
BENCHMARKS = ("imagenet1k", "imagenet100", "imagenet10", "imagenet20")


def normalize_benchmark(benchmark: str) -> str:
    """The canonical benchmark name: ``"ImageNet-100"`` -> ``"imagenet100"``, ``"imagenet"`` -> ``"imagenet1k"``."""
    key = benchmark.lower().replace("-", "").replace("_", "")
    key = {"imagenet": "imagenet1k", "imagenet1000": "imagenet1k", "in1k": "imagenet1k"}.get(key, key)
    if key not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {benchmark!r}; known: {', '.join(BENCHMARKS)}")
    return key


def read_text(path: str | os.PathLike[str], expected: str) -> str:
    """The UTF-8 text of a user's text file; a DataError naming the file, the line and ``expected`` (what such a
    file holds) where it is not text (e.g. an image passed as a list file)."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({expected})") from None


def _read_columns(path: str | os.PathLike[str]) -> list[list[str]]:
    """Non-blank, non-comment lines of ``path``, each split on tabs."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"class-name file not found: {path}")
    rows = []
    for raw in read_text(file, "a class-name file holds one name per line").splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            rows.append([field.strip() for field in line.split("\t")])
    if not rows:
        raise DataError(f"class-name file {path} lists no classes")
    return rows


def read_class_names(file: str | os.PathLike[str]) -> list[str]:
    """Class names from ``file``: line i names label i, either ``name`` or ``id<TAB>name``.

    Blank lines and lines starting with ``#`` are skipped.
    """
    return [row[-1] for row in _read_columns(file)]


def class_names(benchmark: str) -> list[str]:
    """The shipped class names of ``benchmark`` (imagenet1k / imagenet100 / imagenet10 / imagenet20), in label order."""
    return read_class_names(CLASSNAME_DIR / f"{normalize_benchmark(benchmark)}.txt")


def class_wnids(benchmark: str) -> list[str]:
    """The WordNet ids of ``benchmark``'s classes in label order (sorted), e.g. ``n01440764`` first for imagenet1k."""
    return [row[0] for row in _read_columns(CLASSNAME_DIR / f"{normalize_benchmark(benchmark)}.txt")]


def class_list(spec: str | os.PathLike[str]) -> list[str]:
    """Class names from a file, or the shipped list when ``spec`` names a benchmark (e.g. ``imagenet100``)."""
    if Path(spec).is_file():
        return read_class_names(spec)
    try:
        return class_names(os.fspath(spec))
    except ValueError:
        raise DataError(f"--classes {spec}: neither a class-name file nor a known benchmark "
                        f"({', '.join(BENCHMARKS)})") from None
