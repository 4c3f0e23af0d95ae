"""Training images for label-driven methods (LAPT): images for each ID and negative label, with no ID data.

Three sources, combinable:
- retrieval: rank a local image pool (an image folder, a list file, ``embedded:<split>`` or a safetensors file
  with a ``features`` [P, E] tensor, e.g. a feature-cache entry) by text-to-image cosine, top-k per label,
  each image kept once (under the label it matches best);
- a user folder with one subfolder per label (folder name = label text);
- generation with diffusers (optional: needs ``pip install diffusers`` and a GPU; otherwise it reports why it
  is unavailable).

``save_collection`` writes ``collection.txt`` (``<image> <label>`` lines), ``classnames.txt`` (the label texts)
and ``features.safetensors`` (features [N, E], labels [N]).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from promptkit.data.atomic import atomic_write
from promptkit.data.cache import extract_features
from promptkit.data.errors import DataError
from promptkit.data.sources import ImageFolderSource, ImageSource, open_source
from promptkit.errors import UserError

RETRIEVAL_TEMPLATE = "{}"  # LAPT retrieves and generates with the bare label text


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

    ``extract_options`` go to ``extract_features`` (cache_dir, batch_size, shard_size, on_error, progress)."""
    if isinstance(spec, (str, os.PathLike)) and str(spec).endswith(".safetensors"):
        path = Path(spec).expanduser()
        try:
            features = load_file(str(path))["features"]
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
    image = image_features / image_features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    text = text_features.to(image) / text_features.to(image).norm(dim=-1, keepdim=True).clamp_min(1e-12)
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


def save_collection(collection: Collection, directory: str | os.PathLike[str]) -> Path:
    """Write ``collection.txt``, ``classnames.txt`` and ``features.safetensors`` into ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "collection.txt") as tmp:
        tmp.write_text("".join(f"{o} {int(y)}\n" for o, y in zip(collection.origins, collection.labels)))
    with atomic_write(out / "classnames.txt") as tmp:
        tmp.write_text("".join(f"{n}\n" for n in collection.label_names))
    with atomic_write(out / "features.safetensors") as tmp:
        save_file({"features": collection.features.contiguous(), "labels": collection.labels.contiguous()},
                  str(tmp))
    return out
