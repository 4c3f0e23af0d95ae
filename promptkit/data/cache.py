"""Image-feature extraction with an on-disk cache.

Features are extracted once per (model, preprocessing, image set) and stored as ``<key>.safetensors`` plus a
``<key>.json`` sidecar in the cache folder. The key hashes the model's fingerprint, the preprocessing's repr and
the source's fingerprint (for files: every path, size and mtime), so any change to those is a cache miss.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from promptkit import __version__
from promptkit.data.atomic import atomic_write
from promptkit.data.errors import BadImageError, DataError
from promptkit.data.sources import ImageSource

CACHE_FORMAT = 1  # bump when the stored layout or the extraction semantics change


class ImageEncoder(Protocol):
    """What ``extract_features`` needs from a CLIP wrapper."""

    name: str
    fingerprint: str  # changes whenever the weights or the image tower change
    preprocess: Callable[[Image.Image], Tensor]  # PIL -> [3,H,W]

    def encode_images(self, x: Tensor) -> Tensor:
        """``[B,3,H,W]`` -> ``[B,E]`` raw (not normalised) image features."""
        ...


@dataclass
class Features:
    """Extracted image features.

    Attributes:
        features: ``[N,E]`` float32 raw image features (not L2-normalised), one row per readable image.
        labels: ``[N]`` int64 labels of those images (-1 where unknown).
        kept: ``[N]`` int64 indices of those images in the source.
        skipped: ``describe(i)`` of every image that could not be read.
    """

    features: Tensor
    labels: Tensor
    kept: Tensor
    skipped: list[str]


def default_cache_dir() -> Path:
    """``$PROMPTKIT_CACHE`` if set, else ``~/.cache/promptkit/features``."""
    env = os.environ.get("PROMPTKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "promptkit" / "features"


def cache_key(clip: ImageEncoder, source: ImageSource) -> str:
    """The hex sha256 naming the cache entry of ``clip``'s features of ``source``."""
    # A repr may show an object's memory address (e.g. a plain function inside Compose); drop it so the
    # key is the same in every process.
    preprocess = re.sub(r" at 0x[0-9a-fA-F]+", "", repr(clip.preprocess))
    parts = [CACHE_FORMAT, clip.fingerprint, preprocess, source.fingerprint()]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


class _Preprocessed(Dataset):
    """Yields (image tensor or None, index, error message or None): bad images are reported, not raised,
    so that the main process applies the error policy whatever the number of workers."""

    def __init__(self, source: ImageSource, preprocess: Callable[[Image.Image], Tensor]) -> None:
        self.source = source
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> _Item:
        try:
            image = self.source.load(i)
        except BadImageError as e:
            return None, i, e.reason or str(e)
        return self.preprocess(image), i, None


_Item = tuple[Tensor | None, int, str | None]


def _collate(items: list[_Item]) -> tuple[Tensor | None, list[int], list[tuple[int, str]]]:
    good = [(x, i) for x, i, _ in items if x is not None]
    bad = [(i, err) for x, i, err in items if x is None]
    images = torch.stack([x for x, _ in good]) if good else None
    return images, [i for _, i in good], bad


def _load_entry(st_path: Path, json_path: Path, key: str) -> Features | None:
    """The cached features, or None if the entry is absent or unreadable (then it is rebuilt)."""
    if not (st_path.is_file() and json_path.is_file()):
        return None
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
        t = load_file(st_path)
        feats = Features(t["features"], t["labels"], t["kept"], list(meta["skipped"]))
        if meta["key"] != key or not (len(feats.features) == len(feats.labels) == len(feats.kept)):
            raise ValueError("entry does not match its key")
        return feats
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        warnings.warn(f"ignoring unreadable feature cache entry {st_path}: {e}", stacklevel=3)
        return None


def _warn_skipped(skipped: list[str], n: int) -> None:
    if skipped:
        warnings.warn(f"skipped {len(skipped)} of {n} unreadable images (first: {skipped[0]})", stacklevel=3)


def extract_features(
    clip: ImageEncoder,
    source: ImageSource,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike[str] | None = None,
    on_error: Literal["skip", "fail"] = "skip",
    progress: bool = True,
    *,
    use_cache: bool = True,
    num_workers: int = 0,
) -> Features:
    """Encode every image of ``source`` with ``clip``, reading and writing the feature cache.

    Args:
        clip: the encoder (``encode_images``, ``preprocess``, ``fingerprint``, ``name``).
        source: the images.
        batch_size: images per ``encode_images`` call.
        device: where ``encode_images`` runs; the features come back on the CPU.
        cache_dir: cache folder (default ``default_cache_dir()``).
        on_error: ``"skip"`` leaves unreadable images out (warning with the count; ``skipped`` lists them),
            ``"fail"`` raises ``BadImageError`` naming the first one.
        progress: show a tqdm bar (only when stderr is a terminal).
        use_cache: False extracts without reading or writing the cache.
        num_workers: DataLoader worker processes for image decoding.

    Returns:
        ``Features`` with ``features [N,E]`` fp32, ``labels [N]``, ``kept [N]`` and ``skipped``.
    """
    if on_error not in ("skip", "fail"):
        raise ValueError(f"extract_features: on_error must be 'skip' or 'fail', got {on_error!r}")
    if batch_size < 1:
        raise ValueError(f"extract_features: batch_size must be >= 1, got {batch_size}")
    if len(source) == 0:
        raise DataError("extract_features: the image source is empty")

    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = cache_key(clip, source)
    st_path, json_path = folder / f"{key}.safetensors", folder / f"{key}.json"
    if use_cache:
        cached = _load_entry(st_path, json_path, key)
        if cached is not None:
            if cached.skipped and on_error == "fail":
                raise BadImageError(cached.skipped[0], "recorded as unreadable in the feature cache")
            _warn_skipped(cached.skipped, len(source))
            return cached

    loader = DataLoader(
        _Preprocessed(source, clip.preprocess),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=torch.device(device).type == "cuda",
    )
    chunks: list[Tensor] = []
    kept: list[int] = []
    skipped: list[str] = []
    bar = tqdm(total=len(source), unit="img", desc=f"features {clip.name}",
               disable=not progress or not sys.stderr.isatty())
    with bar, torch.no_grad():
        for images, idx, bad in loader:
            for i, reason in bad:
                if on_error == "fail":
                    raise BadImageError(source.describe(i), reason)
                skipped.append(source.describe(i))
            if images is not None:
                out = clip.encode_images(images.to(device, non_blocking=True))
                if out.ndim != 2 or out.shape[0] != len(idx):
                    raise ValueError(f"{clip.name}.encode_images returned shape {list(out.shape)} "
                                     f"for a batch of {len(idx)} images; expected [B, E]")
                chunks.append(out.detach().float().cpu())
                kept.extend(idx)
            bar.update(len(idx) + len(bad))
    _warn_skipped(skipped, len(source))
    if not chunks:
        raise DataError(f"no readable images among {len(source)} (first: {source.describe(0)})")

    kept_t = torch.tensor(kept, dtype=torch.int64)
    feats = Features(torch.cat(chunks).contiguous(), source.labels[kept_t].clone(), kept_t, skipped)
    if use_cache:
        _store_entry(st_path, json_path, key, feats, clip, source)
    return feats


def _store_entry(st_path: Path, json_path: Path, key: str, feats: Features, clip: ImageEncoder,
                 source: ImageSource) -> None:
    # The tensors go first and the sidecar last: a sidecar on disk means a complete entry.
    with atomic_write(st_path) as tmp:
        save_file({"features": feats.features, "labels": feats.labels, "kept": feats.kept}, str(tmp))
    meta = {
        "format": CACHE_FORMAT,
        "key": key,
        "model": clip.name,
        "source": f"{type(source).__name__}: {source.describe(0)} ... ({len(source)} images)",
        "n_images": len(source),
        "n_features": len(feats.features),
        "feature_dim": int(feats.features.shape[1]),
        "skipped": feats.skipped,
        "promptkit_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    with atomic_write(json_path) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
