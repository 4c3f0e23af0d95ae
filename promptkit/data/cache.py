"""The on-disk cache of frozen tensors (image features, NegMine word embeddings) and image-feature extraction.

One mechanism serves every kind of cached tensor (``CacheEntry``):

- **Key**: ``entry_key(kind, *depends_on)``, the hex sha256 of ``[CACHE_FORMAT, kind, *depends_on]`` as JSON,
  where ``depends_on`` is everything the tensors are a function of: the model fingerprint, the inputs' identity
  or hash and the settings. Image features: the model fingerprint, the preprocessing's repr and the source's
  fingerprint (for files: every path, size and mtime). Word embeddings (``promptkit.negmine``): the model
  fingerprint, the prompt template and the sha256 of the word list. Any change to those is a cache miss.
- **Layout**: in the cache folder (``default_cache_dir()``), entry ``<kind>-<key>`` is the tensor file
  ``<kind>-<key>.safetensors`` (or, for an entry stored in parts, the files ``<kind>-<key>.shards/<part>``) and
  the index ``<kind>-<key>.json``, written last: an index on disk means a complete entry. The index records the
  format, kind, key, model fingerprint, a description of the inputs (``source``), the promptkit version, the
  time, and the kind's own fields (e.g. ``n_images`` and ``shards``).
- **Integrity**: every tensor file records a checksum of its tensors and the entry's key
  (``promptkit.data.integrity``), verified on every read; every file is written atomically
  (``promptkit.data.atomic``).
- **A damaged entry** (a corrupt or foreign file, a file without a checksum from an older promptkit, an index
  that does not match) is stale: it is rebuilt after a one-line warning, never used. A damaged part is removed
  with its own warning, so that only it is rebuilt.

Image features: a set larger than one shard (``shard_size`` images, 4096 by default) is stored in parts: images
``[start, stop)`` go to ``<kind>-<key>.shards/<start>-<stop>.safetensors`` (each a complete file that records its
unreadable images in its metadata), and the index lists them. The shards depend only on the set and
``shard_size``, never on the number of processes: under ``torchrun`` each rank encodes a contiguous run of shards
(``promptkit.distributed.shard``), rank 0 writes the index, and every rank then reads the same entry as a
single-process run would have written. A rerun after an interruption keeps the finished shards. Features that
cannot be L2-normalised (a row that is all zero or not finite, e.g. from broken weights or an fp16 overflow) are
refused naming the image, before anything is cached: the scores would otherwise be uniform for that image
without a word.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import torch
from PIL import Image
from safetensors import SafetensorError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torch.utils.data import Subset as _IndexSubset
from tqdm.auto import tqdm

from promptkit import distributed
from promptkit.data.atomic import atomic_write
from promptkit.data.errors import BadImageError, DataError
from promptkit.data.integrity import load_tensors, save_tensors
from promptkit.data.sources import ImageSource
from promptkit.version import __version__

CACHE_FORMAT = 3  # bump when the stored layout or the semantics of a cached kind change
DEFAULT_SHARD_SIZE = 4096  # images per cache shard; sets up to this size are stored as one file
FEATURE_KIND = "feature"  # the kind of image-feature entries

T = TypeVar("T")


def default_cache_dir() -> Path:
    """``$PROMPTKIT_CACHE`` if set, else ``~/.cache/promptkit/features`` (it holds every kind of entry)."""
    env = os.environ.get("PROMPTKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "promptkit" / "features"


def cache_folder(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder ``cache_dir`` (``~`` expanded), or ``default_cache_dir()`` when it is None."""
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def entry_key(kind: str, *depends_on: Any) -> str:
    """The hex sha256 naming the entry of ``kind`` whose tensors are a function of ``depends_on`` (JSON values)."""
    return hashlib.sha256(json.dumps([CACHE_FORMAT, kind, *depends_on]).encode()).hexdigest()


# What reading a damaged, foreign or outdated cache file raises (IntegrityError is a ValueError).
_UNREADABLE = (OSError, ValueError, KeyError, TypeError, SafetensorError)


@dataclass(frozen=True)
class CacheEntry:
    """One entry of the cache: its tensor file(s) and its index (see the module docstring for the layout).

    Attributes:
        folder: the cache folder.
        kind: what the entry holds (``"feature"``, ``"text"``); it prefixes the file names and the warnings.
        key: ``entry_key(kind, ...)``.
    """

    folder: Path
    kind: str
    key: str

    @property
    def name(self) -> str:
        """``<kind>-<key>``: the stem of every file of the entry."""
        return f"{self.kind}-{self.key}"

    @property
    def index_path(self) -> Path:
        """The index, ``<name>.json``: present only once the entry is complete."""
        return self.folder / f"{self.name}.json"

    @property
    def tensors_path(self) -> Path:
        """The tensor file of an entry stored in one file."""
        return self.folder / f"{self.name}.safetensors"

    def part_path(self, part: str) -> Path:
        """The tensor file ``part`` of an entry stored in parts (``<name>.shards/<part>``)."""
        return self.folder / f"{self.name}.shards" / part

    def write_tensors(self, tensors: Mapping[str, Tensor], path: Path | None = None,
                      metadata: Mapping[str, str] | None = None) -> None:
        """Write ``tensors`` atomically with their checksum and this entry's key to ``path`` (default: the
        one-file tensor path); ``metadata`` adds string fields."""
        save_tensors(path or self.tensors_path, tensors, metadata={**(metadata or {}), "key": self.key})

    def read_tensors(self, path: Path | None = None) -> tuple[dict[str, Tensor], dict[str, str]]:
        """The tensors and metadata of ``path`` (default: the one-file tensor path), verified.

        Raises:
            OSError, ValueError, SafetensorError: the file is missing, corrupt, without a checksum or of another
                entry.
        """
        target = path or self.tensors_path
        tensors, metadata = load_tensors(target)
        if metadata.get("key") != self.key:
            raise ValueError(f"{target.name} belongs to another entry")
        return tensors, metadata

    def write_index(self, fingerprint: str, source: str, **fields: Any) -> None:
        """Write the index last, atomically: from then on the entry is complete.

        Args:
            fingerprint: the model fingerprint the tensors came from.
            source: what the tensors were computed from, for people reading the folder.
            fields: the kind's own JSON fields (sizes, settings, parts).
        """
        index = {
            "format": CACHE_FORMAT,
            "kind": self.kind,
            "key": self.key,
            "fingerprint": fingerprint,
            "source": source,
            **fields,
            "promptkit_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        with atomic_write(self.index_path) as tmp:
            tmp.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

    def load(self, decode: Callable[[dict[str, Any]], T | None]) -> T | None:
        """``decode(index)`` of the complete entry, or None when it is absent or damaged (then it is to be rebuilt).

        ``decode`` reads the tensors (``read_tensors``) and checks them against the index, raising OSError,
        ValueError, KeyError, TypeError or SafetensorError when they do not fit; that gives a one-line warning
        naming the index. ``decode`` returns None for an entry it found incomplete and already warned about (a
        damaged part that ``finished_part`` removed).
        """
        if not self.index_path.is_file():
            return None
        try:
            index = json.loads(self.index_path.read_text(encoding="utf-8"))
            if index["key"] != self.key or index["kind"] != self.kind:
                raise ValueError("entry does not match its key")
            return decode(index)
        except _UNREADABLE as e:
            warnings.warn(f"ignoring unreadable {self.kind} cache entry {self.index_path} ({e}); rebuilding it",
                          stacklevel=3)
            return None

    def finished_part(self, path: Path, decode: Callable[[dict[str, Tensor], dict[str, str]], T]) -> T | None:
        """``decode(*read_tensors(path))`` when ``path`` is a complete, intact part of this entry, else None.

        A part that exists but fails its checks (``decode`` raising as in ``load``) is removed with a one-line
        warning: the rebuild then makes it again, silently, and the warning is given once.
        """
        if not path.is_file():
            return None
        try:
            return decode(*self.read_tensors(path))
        except _UNREADABLE as e:
            warnings.warn(f"rebuilding {self.kind} cache shard {path} ({e})", stacklevel=4)
            path.unlink(missing_ok=True)
            return None


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

    def tensors(self) -> dict[str, Tensor]:
        """The tensors a cache file stores."""
        return {"features": self.features, "labels": self.labels, "kept": self.kept}


def cache_key(clip: ImageEncoder, source: ImageSource) -> str:
    """The hex sha256 naming the cache entry of ``clip``'s features of ``source``."""
    # A repr may show an object's memory address (e.g. a plain function inside Compose); drop it so the
    # key is the same in every process.
    preprocess = re.sub(r" at 0x[0-9a-fA-F]+", "", repr(clip.preprocess))
    return entry_key(FEATURE_KIND, clip.fingerprint, preprocess, source.fingerprint())


def describe_source(source: ImageSource) -> str:
    """A one-line description of an image source: its type, first image and size."""
    return f"{type(source).__name__}: {source.describe(0)} ... ({len(source)} images)"


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


def feature_entry(clip: ImageEncoder, source: ImageSource,
                  cache_dir: str | os.PathLike[str] | None = None) -> CacheEntry:
    """The cache entry of ``clip``'s features of ``source`` in ``cache_dir`` (default ``default_cache_dir()``)."""
    return CacheEntry(cache_folder(cache_dir), FEATURE_KIND, cache_key(clip, source))


def _load_entry(entry: CacheEntry, n_images: int) -> Features | None:
    """The cached features of ``n_images`` images, or None if the entry is absent, incomplete, corrupt or from
    an older promptkit (then it is rebuilt; a corrupt shard is removed, with a warning, so that only it is)."""

    def decode(index: dict[str, Any]) -> Features | None:
        if index["n_images"] != n_images:
            raise ValueError("entry does not match its key")
        if "shards" in index:
            parts = []
            for name in index["shards"]:
                path = entry.part_path(name)
                if not path.is_file():
                    raise ValueError(f"shard {path} is missing")
                shard = _finished_shard(entry, path, n_images)
                if shard is None:  # corrupt: _finished_shard warned and removed it
                    return None
                parts.append(shard)
            feats = _join(parts)
        else:
            t, _ = entry.read_tensors()
            feats = Features(t["features"], t["labels"], t["kept"], list(index["skipped"]))
        _check_layout(feats, n_images, entry.index_path)
        if len(feats.features) != index["n_features"]:
            raise ValueError("entry does not match its key")
        return feats

    return entry.load(decode)


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


def _shard_decoder(path: Path, n_images: int) -> Callable[[dict[str, Tensor], dict[str, str]], Features]:
    """Stored shard tensors and metadata -> ``Features``, checked (ValueError/KeyError when they do not fit)."""

    def decode(t: dict[str, Tensor], meta: dict[str, str]) -> Features:
        feats = Features(t["features"], t["labels"], t["kept"], list(json.loads(meta["skipped"])))
        _check_layout(feats, n_images, path)
        return feats

    return decode


def _read_shard(entry: CacheEntry, path: Path, n_images: int) -> Features:
    """One shard file, verified; raises OSError/ValueError/SafetensorError when it is missing, foreign, corrupt
    or without a checksum."""
    return _shard_decoder(path, n_images)(*entry.read_tensors(path))


def _finished_shard(entry: CacheEntry, path: Path, n_images: int) -> Features | None:
    """The shard at ``path`` when it is a complete, intact shard of ``entry`` (so a rerun can keep it), else None
    (a damaged one is removed with a warning)."""
    return entry.finished_part(path, _shard_decoder(path, n_images))


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

    entry = feature_entry(clip, source, cache_dir)
    if use_cache:
        cached = _load_entry(entry, len(source))
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
        try:
            if len(spans) == 1:
                if distributed.is_main():  # one shard: rank 0 encodes it, the others wait
                    result = _encode(clip, source, spans[0], batch_size, device, on_error, num_workers, bar)
                    entry.write_tensors(result.tensors())
                    _write_index(entry, result, clip, source, shards=None)
            else:
                mine = distributed.shard(len(spans))
                for span in spans[mine.start:mine.stop]:
                    path = entry.part_path(_shard_name(span))
                    shard = _finished_shard(entry, path, len(source))  # resume: done by an earlier, interrupted run
                    if shard is not None:
                        bar.update(len(span))
                    else:
                        shard = _encode(clip, source, span, batch_size, device, on_error, num_workers, bar)
                        entry.write_tensors(shard.tensors(), path, metadata={"skipped": json.dumps(shard.skipped)})
                    own[span.start] = shard
        except Exception as e:  # every rank must learn of a failure, or the others wait forever below
            error = e
        if not distributed.all_ok(error is None):
            raise error or DataError("feature extraction failed on another rank; see its error above")
        if len(spans) > 1 and distributed.is_main():
            names = [_shard_name(span) for span in spans]
            result = _join([own[span.start] if span.start in own
                            else _read_shard(entry, entry.part_path(name), len(source))
                            for span, name in zip(spans, names)])
            _write_index(entry, result, clip, source, shards=names)
        distributed.barrier()  # the index exists once rank 0 passes here
    written = result if result is not None else _load_entry(entry, len(source))
    if written is None:
        raise DataError(f"the feature cache entry {entry.index_path} was not written (is {entry.folder} shared by "
                        "every rank?)")
    return _checked(written, source, on_error)


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


def _write_index(entry: CacheEntry, feats: Features, clip: ImageEncoder, source: ImageSource,
                 shards: list[str] | None) -> None:
    """Write the index of a feature entry whose tensors are written (one file, or the ``shards`` parts)."""
    fields: dict[str, Any] = {
        "model": clip.name,
        "n_images": len(source),
        "n_features": len(feats.features),
        "feature_dim": int(feats.features.shape[1]),
        "skipped": feats.skipped,
    }
    if shards is not None:
        fields["shards"] = shards
    entry.write_index(clip.fingerprint, describe_source(source), **fields)
