"""Training images for label-driven methods (LAPT): images for each ID and negative label, with no ID data.

Three sources, combinable:
- retrieval: rank a local image pool (an image folder, a list file, ``embedded:<split>`` or a safetensors file
  with a ``features`` [P, E] tensor, e.g. a feature-cache entry) by text-to-image cosine, top-k per label,
  each image kept once (under the label it matches best);
- a user folder with one subfolder per label (folder name = label text);
- generation with diffusers (optional: needs ``pip install diffusers`` and a GPU; otherwise it reports why it
  is unavailable).

``collect_images`` runs the whole collection for a list of label texts (the ``collect`` command and the
training pipeline call it). ``save_collection`` writes ``collection.txt`` (``<image> <label>`` lines),
``classnames.txt`` (the label texts), ``features.safetensors`` (features [N, E], labels [N], with a checksum that
``open_pool`` verifies) and, given the mined negative labels, ``negatives.txt`` (``<pos><TAB><word>`` lines).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import Tensor

from promptkit.data.atomic import atomic_write
from promptkit.data.cache import describe_source, extract_features
from promptkit.data.errors import DataError
from promptkit.data.integrity import load_tensors, save_tensors
from promptkit.data.sources import EmbeddedSource, ImageFolderSource, ImageSource, open_source
from promptkit.errors import UserError

if TYPE_CHECKING:
    from promptkit.negmine import NegativeLabels

RETRIEVAL_TEMPLATE = "{}"  # LAPT retrieves and generates with the bare label text
DEFAULT_POOL = "embedded:train (labels ignored)"  # how collect_images describes its pool when given none


class CollectionUnavailableError(UserError, RuntimeError):
    """A collection source that cannot run here (e.g. generation without diffusers or a GPU)."""


@dataclass
class Collection:
    """Collected training data: features [N, E] (raw), labels [N] in [0, L), where each came from."""

    features: Tensor
    labels: Tensor
    origins: list[str]
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def counts(self) -> Tensor:
        """Images per label [L]."""
        return torch.bincount(self.labels, minlength=len(self.label_names))

    def __add__(self, other: "Collection") -> "Collection":
        if other.label_names != self.label_names:
            raise ValueError("cannot merge collections made for different label lists")
        return Collection(torch.cat([self.features, other.features]), torch.cat([self.labels, other.labels]),
                          self.origins + other.origins, self.label_names)


@dataclass
class Pool:
    """Image features [P, E] of a retrieval pool and a description of each image."""

    features: Tensor
    origins: list[str]


def open_pool(spec: str | os.PathLike[str] | ImageSource, clip, **extract_options) -> Pool:
    """A pool from an image source, a folder/list/``embedded:`` spec, or a safetensors file of features.

    A feature file that records a checksum (one ``save_collection`` wrote) is verified; one without (written by
    another tool) is read as it is. ``extract_options`` go to ``extract_features`` (cache_dir, batch_size,
    shard_size, on_error, progress).

    Raises:
        DataError: a feature file that is corrupt, unreadable, without a ``features`` tensor or of another
            feature size than ``clip``'s (one line naming the file).
    """
    if isinstance(spec, (str, os.PathLike)) and str(spec).endswith(".safetensors"):
        path = Path(spec).expanduser()
        try:  # a corrupt file raises IntegrityError, a DataError naming it
            features = load_tensors(path, require_checksum=False)[0]["features"]
        except (OSError, KeyError, SafetensorError) as error:
            raise DataError(f"{path}: not a feature file with a 'features' tensor ({error})") from error
        if features.ndim != 2 or features.shape[1] != clip.embed_dim:
            raise DataError(f"{path}: features must be [P, {clip.embed_dim}] for {clip.name}, "
                            f"got {list(features.shape)}")
        return Pool(features.float(), [f"{path}[{i}]" for i in range(len(features))])
    source = open_source(spec) if isinstance(spec, (str, os.PathLike)) else spec
    result = extract_features(clip, source, device=clip.device, **extract_options)
    return Pool(result.features, [source.describe(i) for i in result.kept.tolist()])


def rank_pool(image_features: Tensor, text_features: Tensor, per_label: int, deduplicate: bool = True,
              ) -> tuple[Tensor, Tensor]:
    """Top-``per_label`` pool images per label by cosine; with ``deduplicate`` an image chosen by several labels
    stays only with the label of highest cosine. image_features [P, E], text_features [L, E] ->
    (pool indices [N], labels [N]), ordered by label, then by descending cosine."""
    if per_label < 1:
        raise ValueError(f"images per label must be >= 1, got {per_label}")
    image = F.normalize(image_features, dim=-1)
    text = F.normalize(text_features.to(image), dim=-1)
    cos = text @ image.T  # [L, P]
    k = min(per_label, cos.shape[1])
    top = cos.topk(k, dim=1)  # ties: torch's order, fixed for a given input
    labels = torch.arange(cos.shape[0]).repeat_interleave(k)
    indices, values = top.indices.flatten(), top.values.flatten()
    if deduplicate:
        best = torch.full((cos.shape[1],), float("-inf"), dtype=cos.dtype)
        best.scatter_reduce_(0, indices, values, reduce="amax")
        keep = values >= best[indices]
        # exact ties between labels: the first label wins
        first = torch.zeros(cos.shape[1], dtype=torch.bool)
        keep_unique = torch.zeros_like(keep)
        for row in torch.nonzero(keep).flatten().tolist():
            if not first[indices[row]]:
                first[indices[row]] = True
                keep_unique[row] = True
        indices, labels = indices[keep_unique], labels[keep_unique]
    return indices, labels


@torch.no_grad()
def retrieve(clip, pool: Pool, label_names: list[str], per_label: int, deduplicate: bool = True,
             template: str = RETRIEVAL_TEMPLATE) -> Collection:
    """Images for each label from ``pool`` by text-to-image retrieval (see ``rank_pool``)."""
    if not label_names:
        raise ValueError("retrieve: no labels to collect images for")
    text = clip.encode_texts([template.format(n) for n in label_names]).float().cpu()
    indices, labels = rank_pool(pool.features.cpu(), text, per_label, deduplicate)
    return Collection(pool.features.cpu()[indices], labels, [pool.origins[i] for i in indices.tolist()],
                      list(label_names))


def from_folders(clip, root: str | os.PathLike[str], label_names: list[str], **extract_options) -> Collection:
    """Images from ``root/<label>/`` subfolders; each subfolder must be named after one of ``label_names``.

    ``extract_options`` go to ``extract_features``, as in ``open_pool``."""
    source = ImageFolderSource(root, labelled=True)
    index = {name: i for i, name in enumerate(label_names)}
    unknown = [name for name in source.class_names if name not in index]
    if unknown:
        raise DataError(f"{root}: subfolder {unknown[0]!r} is not one of the {len(label_names)} labels "
                        "(name each subfolder after an ID class or a mined negative label)")
    result = extract_features(clip, source, device=clip.device, **extract_options)
    mapping = torch.tensor([index[name] for name in source.class_names])
    return Collection(result.features, mapping[result.labels], [source.describe(i) for i in result.kept.tolist()],
                      list(label_names))


def generation_unavailable() -> str | None:
    """Why text-to-image generation cannot run here, or None when it can."""
    if importlib.util.find_spec("diffusers") is None:
        return "diffusers is not installed (pip install diffusers)"
    if not torch.cuda.is_available():
        return "no CUDA GPU is available"
    return None


def generate(label_names: list[str], per_label: int, out_dir: str | os.PathLike[str], model: str,
             guidance_scale: float = 7.5, seed: int = 0) -> Path:
    """Generate ``per_label`` images per label into ``out_dir/<label>/`` with a diffusers text-to-image model
    (LAPT: SDXL, guidance 7.5, a different seed per image); returns ``out_dir`` for ``from_folders``."""
    reason = generation_unavailable()
    if reason:
        raise CollectionUnavailableError(f"image generation is unavailable: {reason}")
    from diffusers import AutoPipelineForText2Image  # optional dependency

    pipe = AutoPipelineForText2Image.from_pretrained(model, torch_dtype=torch.float16).to("cuda")
    out = Path(out_dir)
    for label, name in enumerate(label_names):
        folder = out / name.replace("/", "_")
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_label):
            generator = torch.Generator("cuda").manual_seed(seed + label * per_label + i)
            image = pipe(name, guidance_scale=guidance_scale, generator=generator).images[0]
            with atomic_write(folder / f"{i:04d}.png") as tmp:
                image.save(tmp, format="PNG")
    return out


def collect_images(clip, labels: list[str], per_label: int, pool: str | os.PathLike[str] | ImageSource | None = None,
                   folders: str | os.PathLike[str] | None = None, generate_model: str | None = None,
                   generated_dir: str | os.PathLike[str] | None = None, *, num_id: int | None = None,
                   **extract_options: Any) -> tuple[Collection, dict[str, Any]]:
    """Training images for ``labels``: retrieval from ``pool``, then generated images, then the user's folders.

    Args:
        clip: the CLIP wrapper whose features are collected.
        labels: the label texts (ID class names, then negative labels); collected labels index this list.
        per_label: images per label to retrieve (and to generate).
        pool: the retrieval pool (see ``open_pool``); None: the embedded training images, labels ignored.
        folders: a folder with one subfolder of images per label (see ``from_folders``), or None.
        generate_model: a diffusers text-to-image model to generate ``per_label`` images per label with, or None.
        generated_dir: where generated images go (``<generated_dir>/<label>/``); needed with ``generate_model``.
        num_id: how many of ``labels`` (the first ones) are ID class names; default all.
        extract_options: passed to ``extract_features`` (cache_dir, batch_size, shard_size, on_error, progress).

    Returns:
        The collection and an info dict: ``pool`` (its description), ``pool_images``, ``collected_images`` and
        ``labels_with_images`` (``{"id": ..., "negative": ...}``, labels that got at least one image).

    Raises:
        CollectionUnavailableError: ``generate_model`` given where generation cannot run (checked first).
        ValueError: ``generate_model`` without ``generated_dir``, or ``num_id`` outside [0, len(labels)].
    """
    num_id = len(labels) if num_id is None else num_id
    if not 0 <= num_id <= len(labels):
        raise ValueError(f"collect_images: num_id must lie in [0, {len(labels)}], got {num_id}")
    if generate_model is not None:
        if generated_dir is None:
            raise ValueError("collect_images: generate_model needs generated_dir for the generated images")
        reason = generation_unavailable()
        if reason:
            raise CollectionUnavailableError(f"image generation with {generate_model} is unavailable: {reason}")
    opened = open_pool(pool if pool is not None else EmbeddedSource("train"), clip, **extract_options)
    collection = retrieve(clip, opened, labels, per_label)
    if generate_model is not None:
        generated = generate(labels, per_label, generated_dir, generate_model)
        collection = collection + from_folders(clip, generated, labels, **extract_options)
    if folders is not None:
        collection = collection + from_folders(clip, folders, labels, **extract_options)
    counts = collection.counts() > 0
    if pool is None:
        description = DEFAULT_POOL
    elif isinstance(pool, (str, os.PathLike)):
        description = os.fspath(pool)
    else:
        description = describe_source(pool)
    info = {"pool": description, "pool_images": len(opened.features), "collected_images": len(collection),
            "labels_with_images": {"id": int(counts[:num_id].sum()), "negative": int(counts[num_id:].sum())}}
    return collection, info


def save_collection(collection: Collection, directory: str | os.PathLike[str],
                    negatives: NegativeLabels | None = None) -> Path:
    """Write ``collection.txt``, ``classnames.txt``, ``features.safetensors`` (checksummed) and, given the
    mined ``negatives``, ``negatives.txt`` (``<pos><TAB><word>`` lines) into ``directory``; returns it."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "collection.txt") as tmp:
        tmp.write_text("".join(f"{o} {int(y)}\n" for o, y in zip(collection.origins, collection.labels)))
    with atomic_write(out / "classnames.txt") as tmp:
        tmp.write_text("".join(f"{n}\n" for n in collection.label_names))
    save_tensors(out / "features.safetensors", {"features": collection.features, "labels": collection.labels})
    if negatives is not None:
        with atomic_write(out / "negatives.txt") as tmp:
            tmp.write_text("".join(f"{p}\t{w}\n" for w, p in zip(negatives.words, negatives.pos)))
    return out
