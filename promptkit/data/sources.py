"""Image sources: one small interface over image folders, list files, the embedded set and subsets.

Every source gives ``len``, ``load(i) -> PIL image (RGB)``, ``labels [N] int64`` (-1 where unknown),
``class_names`` (label -> name, ``[]`` when unlabelled), ``describe(i)`` for messages and ``fingerprint()``,
a hash of the content identity that the feature cache keys on.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import stat
import struct
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from promptkit.assets import ASSETS_DIR, EMBEDDED_IMAGES, EMBEDDED_META
from promptkit.data.classnames import read_class_names, read_text
from promptkit.data.errors import BadImageError, DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
EMBEDDED_PREFIX = "embedded:"

# What PIL raises for unreadable, truncated or hostile files.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


@runtime_checkable
class ImageSource(Protocol):
    """A finite, indexable set of images with optional labels."""

    class_names: list[str]
    labels: Tensor

    def __len__(self) -> int: ...

    def load(self, i: int) -> Image.Image:
        """Image ``i`` as an RGB PIL image; raises ``BadImageError`` if it cannot be read."""
        ...

    def describe(self, i: int) -> str:
        """Where image ``i`` comes from (a path, or ``embedded:<split>[i]``), for messages."""
        ...

    def fingerprint(self) -> str:
        """A hex digest that changes whenever the images, their labels or the class names change."""
        ...


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _open_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so that truncated files fail here and not inside a transform
            return to_rgb(img)
    except _DECODE_ERRORS as e:
        raise BadImageError(str(path), str(e) or type(e).__name__) from e


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB, with high-bit-depth grayscale samples scaled to 0..255, never clipped.

    PIL's own ``convert("RGB")`` clips 16-bit and 32-bit samples at 255, so a 16-bit scan comes out nearly white.
    Here ``I;16``/``I;16L``/``I;16B``/``I;16N`` (16-bit) are divided by 257 (65535 -> 255); ``I`` (32-bit
    integers, how PIL opens some 16-bit PNG and TIFF files) is read as 16-bit samples, clipped to 0..65535 first;
    ``F`` (32-bit float) is read as 0..1 when every sample lies there, else as 0..255 (PIL's convention for F),
    and NaN becomes 0.
    """
    if img.mode.startswith("I;16") or img.mode == "I":
        values = np.clip(np.asarray(img, dtype=np.float64), 0, 65535) / 257.0
    elif img.mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if values.size and values.min() >= 0 and values.max() <= 1:
            values = values * 255.0
    else:
        return img.convert("RGB")
    return Image.fromarray(np.rint(np.clip(values, 0, 255)).astype(np.uint8)).convert("RGB")  # 2-D uint8: L


_Identity = tuple[int, int]  # (st_dev, st_ino): the same folder or file whatever path leads to it


class _Walker:
    """Lists the image files below a root without entering a folder twice or listing a file twice.

    Links are followed, but a link back up the tree (``up -> ..``, ``again -> .``) or to a folder already listed
    is skipped instead of walked again (which never ends, or counts images many times), and so are broken and
    self-referencing links (``x -> x``), second paths to a file already listed and unreadable folders. Every
    skipped entry is counted; ``warn`` reports them in one line with the count and the first of them.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.skipped: list[str] = []
        self.files: set[_Identity] = set()
        self.seen: set[_Identity] = set()  # folders: the root, every folder above it, and those listed
        for folder in (root, *root.parents):
            st = self.stat(folder, count=False)
            if st is not None:
                self.seen.add((st.st_dev, st.st_ino))

    def stat(self, path: str | os.PathLike[str], count: bool = True) -> os.stat_result | None:
        """What ``path`` points to, or None (counted) for a broken or looping link or an entry that vanished."""
        try:
            return os.stat(path)
        except OSError:
            if count:
                self.skipped.append(os.fspath(path))
            return None

    def claim(self, seen: set[_Identity], st: os.stat_result, path: str | os.PathLike[str]) -> bool:
        """True the first time the folder or file ``st`` is met; False (counted) for every later path to it."""
        identity = (st.st_dev, st.st_ino)
        if identity in seen:
            self.skipped.append(os.fspath(path))
            return False
        seen.add(identity)
        return True

    def classify(self, folder: Path) -> tuple[list[str], int, list[str]]:
        """The subfolder names of ``folder``, its number of image files and the entries left out (broken links,
        links to it or above it), not yet counted: a walk of ``folder`` itself meets them again."""
        subdirs, n_images, left_out = [], 0, []
        for entry in self._entries(folder):
            st = self.stat(entry.path, count=False)
            if st is None or (stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) in self.seen):
                left_out.append(entry.path)
            elif stat.S_ISDIR(st.st_mode):
                subdirs.append(entry.name)
            elif stat.S_ISREG(st.st_mode) and _is_image(entry.name):
                n_images += 1
        return subdirs, n_images, left_out

    def claim_folder(self, folder: Path) -> bool:
        """Reserve a folder to be walked on its own (a class folder), so that no other walk enters it."""
        st = self.stat(folder)
        return st is not None and self.claim(self.seen, st, folder)

    def images_under(self, folder: Path) -> list[Path]:
        """The image files below ``folder`` (recursive, hidden entries skipped), in sorted path order."""
        found: list[Path] = []
        pending = [folder]
        while pending:
            subdirs = []
            for entry in self._entries(pending.pop()):
                st = self.stat(entry.path)
                if st is None:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    if self.claim(self.seen, st, entry.path):
                        subdirs.append(Path(entry.path))
                elif stat.S_ISREG(st.st_mode) and _is_image(entry.name) and self.claim(self.files, st, entry.path):
                    found.append(Path(entry.path))
            pending.extend(reversed(subdirs))  # depth first, in name order
        return sorted(found)

    def _entries(self, folder: Path) -> list[os.DirEntry[str]]:
        """The visible entries of ``folder`` in name order; an unreadable folder has none (counted)."""
        try:
            with os.scandir(folder) as entries:
                return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)
        except OSError:
            self.skipped.append(str(folder))
            return []

    def warn(self) -> None:
        """One warning line for everything skipped, if anything was."""
        if self.skipped:
            warnings.warn(f"skipped {len(self.skipped)} broken or looping links, repeated files or folders and "
                          f"unreadable folders under {self.root} (first: {self.skipped[0]})", stacklevel=3)


class _FileListSource:
    """Images stored as files: a path and a label per image."""

    def __init__(self, paths: list[Path], labels: Sequence[int], class_names: list[str]) -> None:
        self.paths = paths
        self.labels = torch.tensor(list(labels), dtype=torch.int64)
        self.class_names = class_names

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> Image.Image:
        return _open_image(self.paths[i])

    def describe(self, i: int) -> str:
        return str(self.paths[i])

    def fingerprint(self) -> str:
        # Path, size and mtime of every file: an edited, touched, added or removed file changes the hash.
        h = hashlib.sha256()
        h.update(json.dumps(self.class_names).encode())
        for path, label in zip(self.paths, self.labels.tolist(), strict=True):
            try:
                st = os.stat(path)
                stamp = f"{st.st_size}:{st.st_mtime_ns}"
            except FileNotFoundError:
                stamp = "missing"
            h.update(f"{path}\0{stamp}\0{label}\n".encode())
        return h.hexdigest()


class ImageFolderSource(_FileListSource):
    """A folder of images: one subfolder per class (labels in sorted folder-name order) or a flat folder.

    Args:
        root: the folder.
        labelled: ``None`` decides from the layout (class subfolders -> labelled, loose images -> unlabelled);
            ``False`` reads every image below ``root`` recursively with label -1 (OOD sets, image pools);
            ``True`` requires class subfolders.
        classes: use only these subfolders, in this order (label i = ``classes[i]``); e.g. the ImageNet-100
            wnids inside an ImageNet-1k ``val`` folder. With ``labelled=False``, their images unlabelled.
        class_names: names for the classes (default: the subfolder names).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        labelled: bool | None = None,
        classes: Sequence[str] | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise DataError(f"image folder not found: {root}")
        if class_names is not None and labelled is False:
            raise ValueError("ImageFolderSource: class_names= needs a labelled folder, not labelled=False")
        walker = _Walker(self.root)
        if classes is None:
            subdirs, n_loose, left_out = walker.classify(self.root)
            if labelled is None:
                if subdirs and n_loose:
                    raise DataError(f"{self.root} has both class subfolders and {n_loose} loose images; "
                                    "pass labelled=False to read every image as unlabelled")
                labelled = bool(subdirs)
            if labelled and not subdirs:
                raise DataError(f"{self.root} has no class subfolders")
        folders = list(classes) if classes is not None else (subdirs if labelled else [""])
        if classes is None and labelled:  # the class folders are walked, not the root: count its links here
            walker.skipped.extend(left_out)
        missing = [f for f in folders if not (self.root / f).is_dir()]
        if missing:
            raise DataError(f"{len(missing)} class folders missing under {self.root}, e.g. {missing[0]!r}")
        # Class folders are reserved before any is walked, so a link from one class into another is not followed.
        walkable = [f == "" or walker.claim_folder(self.root / f) for f in folders]
        per_folder = [walker.images_under(self.root / f) if ok else []
                      for f, ok in zip(folders, walkable, strict=True)]
        walker.warn()
        paths = [p for found in per_folder for p in found]
        if not paths:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}")
        if labelled is False:
            super().__init__(paths, [-1] * len(paths), [])
            return
        names = list(class_names) if class_names is not None else folders
        if len(names) != len(folders):
            raise ValueError(f"ImageFolderSource: {len(names)} class names given for {len(folders)} classes")
        empty = [f for f, found in zip(folders, per_folder, strict=True) if not found]
        if empty:
            warnings.warn(f"{len(empty)} class folders under {self.root} hold no images, e.g. {empty[0]!r}",
                          stacklevel=2)
        labels = [label for label, found in enumerate(per_folder) for _ in found]
        super().__init__(paths, labels, names)


_INTEGER = re.compile(r"[+-]?\d+")


class ListFileSource(_FileListSource):
    """Images named by a list file: one ``relative/path label`` line per image (``#`` comments allowed).

    A line whose last field is not an integer is a path alone, label -1 (a path may hold spaces), unless the
    field before it names an image file (``img.png cat``, ``img.png 1.5``): that is a label that is not an
    integer, refused with the file and line number. Paths are relative to ``root``
    (default: the list file's folder). Class names come from ``class_names``, else from a ``classnames.txt``
    beside the list file, else the label numbers are used (with a warning).
    """

    def __init__(
        self,
        list_file: str | os.PathLike[str],
        root: str | os.PathLike[str] | None = None,
        *,
        class_names: Sequence[str] | None = None,
    ) -> None:
        list_path = Path(list_file).expanduser().resolve()
        if not list_path.is_file():
            raise DataError(f"list file not found: {list_file}")
        base = Path(root).expanduser().resolve() if root is not None else list_path.parent
        if not base.is_dir():
            raise DataError(f"image root not found: {root}")
        paths, labels = [], []
        text = read_text(list_path, "a list file holds `relative/path label` lines")
        for lineno, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(maxsplit=1)
            label = -1
            if len(parts) == 2 and _INTEGER.fullmatch(parts[1]):
                line, label = parts[0], int(parts[1])
            elif len(parts) == 2 and _is_image(Path(parts[0]).name) and not (base / line).is_file():
                raise DataError(f"{list_path}:{lineno}: label {parts[1]!r} is not an integer "
                                "(lines are `relative/path label`, label -1 or none for unknown)")
            if label < -1:
                raise DataError(f"{list_path}:{lineno}: label {label} is negative (use -1 for unknown)")
            paths.append(base / line)
            labels.append(label)
        if not paths:
            raise DataError(f"list file {list_path} names no images")
        n_classes = max(labels) + 1
        if class_names is None and (list_path.parent / "classnames.txt").is_file():
            class_names = read_class_names(list_path.parent / "classnames.txt")
        if class_names is None and n_classes > 0:
            warnings.warn(f"no class names for {list_path} (pass class_names or put a classnames.txt beside it); "
                          "using the label numbers", stacklevel=2)
            class_names = [str(c) for c in range(n_classes)]
        names = list(class_names or [])
        if n_classes > len(names):
            raise DataError(f"{list_path}: label {n_classes - 1} has no class name ({len(names)} names)")
        self.list_file = list_path
        super().__init__(paths, labels, names)


class EmbeddedSource:
    """A split of the image set shipped with promptkit (``embedded.npz`` + ``embedded.json`` in ``asset_dir``,
    default ``promptkit/assets``).

    ``split`` is ``"train"``, ``"test"`` (labelled with the ID classes) or the name of an OOD set (label -1).
    """

    def __init__(self, split: str, asset_dir: str | os.PathLike[str] | None = None) -> None:
        folder = Path(asset_dir) if asset_dir is not None else ASSETS_DIR
        meta = _read_embedded_meta(folder)
        npz_path = folder / EMBEDDED_IMAGES.name
        if not npz_path.is_file():
            raise DataError(f"embedded image set not found: {npz_path}")
        splits = _splits(meta)
        if split not in splits:
            raise DataError(f"no embedded split {split!r}; available: {', '.join(splits)}")
        labelled = split in ("train", "test")
        keys = [f"{split}_images", f"{split}_labels"] if labelled else [f"ood_{split}_images"]
        with np.load(npz_path, allow_pickle=False) as npz:
            absent = [k for k in keys if k not in npz.files]
            if absent:
                raise DataError(f"{npz_path} has no array {absent[0]!r} for split {split!r}")
            images = npz[keys[0]]
            labels = npz[keys[1]].astype(np.int64) if labelled else np.full(len(images), -1, dtype=np.int64)
        self.class_names = [str(c) for c in meta["id_classes"]] if labelled else []
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) != len(labels):
            raise DataError(f"{npz_path}: split {split!r} must be uint8 [N,H,W] or [N,H,W,3] with N labels, "
                            f"got {images.dtype} {list(images.shape)} and {len(labels)} labels")
        if labelled and len(labels) and not 0 <= labels.min() <= labels.max() < len(self.class_names):
            raise DataError(f"{npz_path}: {split} labels must lie in [0, {len(self.class_names)})")
        self.split = split
        self.images = images
        self.labels = torch.from_numpy(labels)

    def __len__(self) -> int:
        return len(self.images)

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i]).convert("RGB")

    def describe(self, i: int) -> str:
        return f"{EMBEDDED_PREFIX}{self.split}[{i}]"

    def fingerprint(self) -> str:
        return self._digest

    @functools.cached_property
    def _digest(self) -> str:
        """The hash of the split's bytes, computed once: the arrays are immutable once loaded."""
        h = hashlib.sha256(f"embedded:{self.split}:{self.images.shape}".encode())
        h.update(np.ascontiguousarray(self.images).tobytes())
        h.update(self.labels.numpy().tobytes())
        h.update(json.dumps(self.class_names).encode())
        return h.hexdigest()


def _read_embedded_meta(folder: Path) -> dict:
    path = folder / EMBEDDED_META.name
    if not path.is_file():
        raise DataError(f"embedded image set description not found: {path}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(meta.get("id_classes"), list) or not isinstance(meta.get("ood_sets"), dict):
        raise DataError(f"{path}: needs 'id_classes' (list) and 'ood_sets' (object)")
    return meta


def _splits(meta: dict) -> dict[str, str]:
    return {"train": "ID training pool", "test": "ID test set", **{str(k): str(v) for k, v in meta["ood_sets"].items()}}


def embedded_splits(asset_dir: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """The embedded splits, name -> description: ``train``, ``test`` and each OOD set."""
    return _splits(_read_embedded_meta(Path(asset_dir) if asset_dir is not None else ASSETS_DIR))


class Subset:
    """The images ``indices`` of another source; labels and class names carry over unchanged."""

    def __init__(self, source: ImageSource, indices: Sequence[int] | Tensor) -> None:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        if idx.ndim != 1:
            raise ValueError(f"Subset: indices must be 1-D, got shape {list(idx.shape)}")
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(source)):
            raise ValueError(f"Subset: indices must lie in [0, {len(source)}), "
                             f"got [{int(idx.min())}, {int(idx.max())}]")
        self.source = source
        self.indices = idx
        self.labels = source.labels[idx]
        self.class_names = source.class_names

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, i: int) -> Image.Image:
        return self.source.load(int(self.indices[i]))

    def describe(self, i: int) -> str:
        return self.source.describe(int(self.indices[i]))

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"subset:{self.source.fingerprint()}:".encode())
        h.update(self.indices.numpy().tobytes())
        return h.hexdigest()


def open_source(spec: str | os.PathLike[str], *, asset_dir: str | os.PathLike[str] | None = None) -> ImageSource:
    """Open ``spec``: ``"embedded:<split>"``, an image folder, or a list file (``path label`` lines)."""
    text = os.fspath(spec)
    if text.startswith(EMBEDDED_PREFIX):
        return EmbeddedSource(text[len(EMBEDDED_PREFIX):], asset_dir=asset_dir)
    path = Path(text).expanduser()
    if path.is_dir():
        return ImageFolderSource(path)
    if path.is_file():
        return ListFileSource(path)
    raise DataError(f"no such image folder or list file: {text}")
