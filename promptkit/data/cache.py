"""Image-feature extraction with an on-disk cache.

Features are extracted once per (model, preprocessing, image set) and stored as ``<key>.safetensors`` plus a
``<key>.json`` sidecar in the cache folder. The key hashes the model's fingerprint, the preprocessing's repr and
the source's fingerprint (for files: every path, size and mtime), so any change to those is a cache miss.

A set larger than one shard (``shard_size`` images, 4096 by default) is stored as shards instead: images
``[start, stop)`` go to ``<key>.shards/<start>-<stop>.safetensors`` (each a complete file, written atomically, that
records its unreadable images in its metadata), and ``<key>.json``, written last, lists them. The shards depend only
on the set and ``shard_size``, never on the number of processes: under ``torchrun`` each rank encodes a contiguous
run of shards (``promptkit.distributed.shard``), rank 0 writes the index, and every rank then reads the same entry
as a single-process run would have written. A rerun after an interruption keeps the finished shards.

Every tensor file records a checksum of its tensors (``promptkit.data.integrity``), verified on every read. A
corrupt file, or one without a checksum (an older promptkit), is stale: it is rebuilt with a one-line warning,
never used. Features that cannot be L2-normalised (a row that is all zero or not finite, e.g. from broken
weights or an fp16 overflow) are refused naming the image, before anything is cached: the scores would
otherwise be uniform for that image without a word.
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
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torch.utils.data import Subset as _IndexSubset
from tqdm.auto import tqdm

from promptkit import __version__, distributed
from promptkit.data.atomic import atomic_write
from promptkit.data.errors import BadImageError, DataError
from promptkit.data.integrity import load_tensors, save_tensors
from promptkit.data.sources import ImageSource

CACHE_FORMAT = 2  # bump when the stored layout or the extraction semantics change
DEFAULT_SHARD_SIZE = 4096  # images per cache shard; sets up to this size are stored as one file


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


# What reading a damaged, foreign or outdated cache file raises (IntegrityError is a ValueError).
_UNREADABLE = (OSError, ValueError, KeyError, TypeError, SafetensorError)


def _load_entry(folder: Path, key: str, n_images: int) -> Features | None:
    """The cached features of ``n_images`` images, or None if the entry is absent, incomplete, corrupt or from
    an older promptkit (then it is rebuilt; a corrupt shard is removed, with a warning, so that only it is)."""
    json_path = folder / f"{key}.json"
    if not json_path.is_file():
        return None
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
        if meta["key"] != key or meta["n_images"] != n_images:
            raise ValueError("entry does not match its key")
        if "shards" in meta:
            parts = []
            for name in meta["shards"]:
                path = folder / f"{key}.shards" / name
                if not path.is_file():
                    raise ValueError(f"shard {path} is missing")
                shard = _finished_shard(path, key, n_images)
                if shard is None:  # corrupt: _finished_shard warned and removed it
                    return None
                parts.append(shard)
            feats = _join(parts)
        else:
            t, stored = load_tensors(folder / f"{key}.safetensors")
            if stored.get("key") != key:
                raise ValueError("entry does not match its key")
            feats = Features(t["features"], t["labels"], t["kept"], list(meta["skipped"]))
        _check_layout(feats, n_images, json_path)
        if len(feats.features) != meta["n_features"]:
            raise ValueError("entry does not match its key")
        return feats
    except _UNREADABLE as e:
        warnings.warn(f"ignoring unreadable feature cache entry {json_path} ({e}); rebuilding it", stacklevel=3)
        return None


def _check_layout(feats: Features, n_images: int, where: Path) -> None:
    """Raise ValueError unless ``feats`` is laid out as ``_encode`` makes it (fp32 rows, increasing indices)."""
    f, labels, kept = feats.features, feats.labels, feats.kept
    if (f.dtype != torch.float32 or f.ndim != 2 or labels.dtype != torch.int64 or kept.dtype != torch.int64
            or labels.ndim != 1 or kept.ndim != 1 or not len(f) == len(labels) == len(kept)):
        raise ValueError(f"{where}: tensors of the wrong dtype or shape")
    if len(kept) and (int(kept.min()) < 0 or int(kept.max()) >= n_images or bool((kept.diff() <= 0).any())):
        raise ValueError(f"{where}: image indices outside [0, {n_images}) or out of order")


def _spans(n: int, shard_size: int) -> list[range]:
    """The fixed-size shards ``[start, stop)`` of ``n`` images (the last may be shorter)."""
    return [range(start, min(start + shard_size, n)) for start in range(0, n, shard_size)]


def _shard_name(span: range) -> str:
    return f"{span.start:010d}-{span.stop:010d}.safetensors"


def _write_shard(path: Path, key: str, feats: Features) -> None:
    tensors = {"features": feats.features, "labels": feats.labels, "kept": feats.kept}
    save_tensors(path, tensors, metadata={"key": key, "skipped": json.dumps(feats.skipped)})


def _read_shard(path: Path, key: str, n_images: int) -> Features:
    """One shard file, verified; raises OSError/ValueError/SafetensorError when it is missing, foreign, corrupt
    or without a checksum."""
    t, meta = load_tensors(path)
    if meta.get("key") != key:
        raise ValueError(f"shard {path.name} belongs to another entry")
    feats = Features(t["features"], t["labels"], t["kept"], list(json.loads(meta["skipped"])))
    _check_layout(feats, n_images, path)
    return feats


def _finished_shard(path: Path, key: str, n_images: int) -> Features | None:
    """The shard at ``path`` when it is a complete, intact shard of this entry (so a rerun can keep it), else None.

    A shard file that exists but fails its checks is removed with a one-line warning: the rebuild then encodes
    it again, silently, and the warning is given once.
    """
    if not path.is_file():
        return None
    try:
        return _read_shard(path, key, n_images)
    except _UNREADABLE as e:
        warnings.warn(f"rebuilding feature cache shard {path} ({e})", stacklevel=4)
        path.unlink(missing_ok=True)
        return None


def _join(parts: list[Features]) -> Features:
    """Shards in order -> one ``Features`` (shards whose images were all unreadable hold no rows)."""
    kept = [p for p in parts if len(p.kept)]
    if not kept:
        return Features(torch.zeros(0, 0), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64),
                        [name for p in parts for name in p.skipped])
    return Features(torch.cat([p.features for p in kept]), torch.cat([p.labels for p in kept]),
                    torch.cat([p.kept for p in kept]), [name for p in parts for name in p.skipped])


def _warn_skipped(skipped: list[str], n: int) -> None:
    if skipped:
        warnings.warn(f"skipped {len(skipped)} of {n} unreadable images (first: {skipped[0]})", stacklevel=4)


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
    shard_size: int = DEFAULT_SHARD_SIZE,
) -> Features:
    """Encode every image of ``source`` with ``clip``, reading and writing the feature cache.

    Inside a ``torchrun`` process group every rank must call this with the same arguments: each encodes its
    run of shards, and all return the whole set. The cache folder must then be shared by all ranks.

    Args:
        clip: the encoder (``encode_images``, ``preprocess``, ``fingerprint``, ``name``).
        source: the images.
        batch_size: images per ``encode_images`` call.
        device: where ``encode_images`` runs; the features come back on the CPU.
        cache_dir: cache folder (default ``default_cache_dir()``).
        on_error: ``"skip"`` leaves unreadable images out (warning with the count; ``skipped`` lists them),
            ``"fail"`` raises ``BadImageError`` naming the first one.
        progress: show a tqdm bar (only when stderr is a terminal, and only on rank 0).
        use_cache: False extracts without reading or writing the cache (single process only).
        num_workers: DataLoader worker processes for image decoding.
        shard_size: images per cache shard; a set of more images is stored, and resumed, shard by shard.

    Returns:
        ``Features`` with ``features [N,E]`` fp32, ``labels [N]``, ``kept [N]`` and ``skipped``.

    Raises:
        DataError: no readable image, or the encoder gave an image a feature row that is all zero or not finite
            (naming the first such image; nothing is cached).
        BadImageError: with ``on_error="fail"``, the first unreadable image.
        OutputError: the cache folder cannot be written (full disk, no permission).
    """
    if on_error not in ("skip", "fail"):
        raise ValueError(f"extract_features: on_error must be 'skip' or 'fail', got {on_error!r}")
    if batch_size < 1:
        raise ValueError(f"extract_features: batch_size must be >= 1, got {batch_size}")
    if shard_size < 1:
        raise ValueError(f"extract_features: shard_size must be >= 1, got {shard_size}")
    if len(source) == 0:
        raise DataError("extract_features: the image source is empty")
    if not use_cache and distributed.is_distributed():
        raise ValueError("extract_features: use_cache=False cannot run on several ranks; "
                         "the ranks exchange features through the cache folder")

    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = cache_key(clip, source)
    if use_cache:
        cached = _load_entry(folder, key, len(source))
        # Every rank must take the same branch, and no rank may rewrite a shard another is still reading.
        if distributed.all_ok(cached is not None):
            return _checked(cached, source, on_error)

    bar = tqdm(total=len(source), unit="img", desc=f"features {clip.name}",
               disable=not progress or not sys.stderr.isatty() or not distributed.is_main())
    spans = _spans(len(source), shard_size)
    with bar:
        if not use_cache:
            feats = _encode(clip, source, range(len(source)), batch_size, device, on_error, num_workers, bar)
            return _checked(feats, source, on_error)
        error: Exception | None = None
        result: Features | None = None  # what rank 0 wrote, returned without reading it back
        own: dict[int, Features] = {}  # this rank's shards by first image: joined without reading them back
        shard_dir = folder / f"{key}.shards"
        try:
            if len(spans) == 1:
                if distributed.is_main():  # one shard: rank 0 encodes it, the others wait
                    result = _encode(clip, source, spans[0], batch_size, device, on_error, num_workers, bar)
                    _store_entry(folder, key, result, clip, source, shards=None)
            else:
                mine = distributed.shard(len(spans))
                for span in spans[mine.start:mine.stop]:
                    path = shard_dir / _shard_name(span)
                    shard = _finished_shard(path, key, len(source))  # resume: done by an earlier, interrupted run
                    if shard is not None:
                        bar.update(len(span))
                    else:
                        shard = _encode(clip, source, span, batch_size, device, on_error, num_workers, bar)
                        _write_shard(path, key, shard)
                    own[span.start] = shard
        except Exception as e:  # every rank must learn of a failure, or the others wait forever below
            error = e
        if not distributed.all_ok(error is None):
            raise error or DataError("feature extraction failed on another rank; see its error above")
        if len(spans) > 1 and distributed.is_main():
            names = [_shard_name(span) for span in spans]
            result = _join([own[span.start] if span.start in own
                            else _read_shard(shard_dir / name, key, len(source)) for span, name in zip(spans, names)])
            _store_entry(folder, key, result, clip, source, shards=names)
        distributed.barrier()  # the index exists once rank 0 passes here
    entry = result if result is not None else _load_entry(folder, key, len(source))
    if entry is None:
        raise DataError(f"the feature cache entry {folder / key}.json was not written (is {folder} shared by "
                        "every rank?)")
    return _checked(entry, source, on_error)


def _checked(feats: Features, source: ImageSource, on_error: str) -> Features:
    """Apply the error policy to an extraction's unreadable images."""
    if feats.skipped and on_error == "fail":
        raise BadImageError(feats.skipped[0], "recorded as unreadable in the feature cache")
    _warn_skipped(feats.skipped, len(source))
    if not len(feats.kept):
        raise DataError(f"no readable images among {len(source)} (first: {source.describe(0)})")
    return feats


def _encode(clip: ImageEncoder, source: ImageSource, span: range, batch_size: int, device: str | torch.device,
            on_error: str, num_workers: int, bar: tqdm) -> Features:
    """Features of images ``span`` of ``source`` (``kept`` holds indices into the whole source)."""
    loader = DataLoader(
        _IndexSubset(_Preprocessed(source, clip.preprocess), span),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=torch.device(device).type == "cuda",
    )
    chunks: list[Tensor] = []
    kept: list[int] = []
    skipped: list[str] = []
    with torch.no_grad():
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
                out = out.detach().float().cpu()
                _check_rows(out, [source.describe(i) for i in idx], clip.name)
                chunks.append(out)
                kept.extend(idx)
            bar.update(len(idx) + len(bad))
    kept_t = torch.tensor(kept, dtype=torch.int64)
    features = torch.cat(chunks).contiguous() if chunks else torch.zeros(0, 0)
    return Features(features, source.labels[kept_t].clone(), kept_t, skipped)


def _check_rows(features: Tensor, names: list[str], model: str) -> None:
    """Refuse feature rows that cannot be L2-normalised: all zero, not finite, or so large that the float32
    squared norm overflows (the scores would then be uniform for that image, silently)."""
    energy = features.square().sum(dim=1)
    bad = torch.nonzero(~torch.isfinite(energy) | (energy == 0)).flatten().tolist()
    if bad:
        raise DataError(f"{model} returned image features that are all zero or not finite for {len(bad)} of the "
                        f"{len(names)} images of a batch (first: {names[bad[0]]}); check the model weights and "
                        "these images")


def _store_entry(folder: Path, key: str, feats: Features, clip: ImageEncoder, source: ImageSource,
                 shards: list[str] | None) -> None:
    """Write the entry's sidecar ``<key>.json`` (and, for a one-file entry, its tensors first).

    The sidecar goes last: a sidecar on disk means a complete entry.
    """
    if shards is None:
        save_tensors(folder / f"{key}.safetensors",
                     {"features": feats.features, "labels": feats.labels, "kept": feats.kept}, metadata={"key": key})
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
    if shards is not None:
        meta["shards"] = shards
    with atomic_write(folder / f"{key}.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
