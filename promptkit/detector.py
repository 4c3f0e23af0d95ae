"""A deployed OOD detector: a ``promptkit train`` run loaded once, called on images.

    from promptkit import Detector
    detector = Detector.load("promptkit_runs/coop-seed1", device="cuda")
    for p in detector.predict(["a.png", "b.png"]):      # paths, PIL images, a folder, [B,3,H,W] or [B,E]
        print(p.image, p.label, p.decision, p.score)

A run saves, next to its learned prompts, the text features its score uses (the ``head`` entries of
``prompts.safetensors``): learned prompts never change after training, so neither do their features. ``load``
therefore builds only the model's image tower (reading only its weights) and scores against the head: the text
tower is never built, read or run. The one exception is LSN with CoCoOp positive prompts, whose prompts depend on
each image; its detector loads the whole model (``uses_text_tower``).
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from torch import Tensor

from promptkit.clip.model import ClipModel, load_clip, parse_device
from promptkit.data.atomic import atomic_write
from promptkit.data.cache import extract_features
from promptkit.data.errors import DataError
from promptkit.data.sources import ImageFolderSource, ImageSource, _open_image, to_rgb
from promptkit.methods import Method, load_method, load_scorer
from promptkit.methods.saved import HEAD_PREFIX, PROMPTS_FILE, read_metadata, recorded_model

ImageInput = str | os.PathLike[str] | Image.Image
Images = ImageInput | Sequence[ImageInput] | Tensor


@dataclass(frozen=True)
class Prediction:
    """One image's result.

    Attributes:
        image: the image's path, a PIL image's ``filename`` or ``"<image i>"`` (i: its place in the input);
            None for tensor inputs.
        score: the method's OOD score, higher = more in-distribution.
        is_id: ``score >= threshold`` (True when the run has no threshold).
        label: the predicted ID class name.
    """

    image: str | None
    score: float
    is_id: bool
    label: str

    @property
    def decision(self) -> str:
        """``"ID"`` or ``"OOD"``."""
        return "ID" if self.is_id else "OOD"


class Detector:
    """A saved method on its model's image tower, scoring images without a text tower.

    Build it with :meth:`load`. Attributes: ``clip`` (the model; an image tower alone unless
    ``uses_text_tower``), ``method`` (the method, scoring from the saved text features), ``threshold`` (the
    calibrated decision threshold, None if the run has none; may be reassigned).
    """

    def __init__(self, clip: ClipModel, method: Method) -> None:
        self.clip = clip
        self.method = method
        self.threshold: float | None = method.threshold

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        device: str | torch.device = "cpu",
        *,
        model: str | None = None,
        pretrained: str | os.PathLike[str] | None = None,
        quick_gelu: bool | None = None,
        precision: str = "fp32",
        backend: str = "auto",
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> Detector:
        """Load the run saved in ``directory`` (``prompts.json`` + ``prompts.safetensors``).

        Args:
            directory: a folder written by ``promptkit train``.
            device: where the image tower runs and scores are computed.
            model, pretrained: the model to run on; default the one ``prompts.json`` records (``pretrained``
                alone: other weights for the recorded model, e.g. the same file moved).
            quick_gelu: the activation; default the setting ``prompts.json`` records for its model.
            precision: ``"fp32"``, ``"fp16"`` or ``"bf16"`` image-tower weights.
            backend: the op backend of the score (``"auto"``, ``"torch"``, ``"cpp"``, ``"triton"``, ``"cuda"``).
            cache_dir: open_clip's download cache, for pretrained tags.
        Raises:
            PromptsError, ModelLoadError: one line naming the file and the fix (missing or corrupt files, prompts
                learned on another model, unknown method), before any image is read.
        """
        meta = read_metadata(directory)
        name, pretrained, quick_gelu = recorded_model(meta, model, pretrained, quick_gelu)
        device = parse_device(device)
        options = dict(device=device, precision=precision, quick_gelu=quick_gelu, cache_dir=cache_dir)
        method = None
        if _has_head(directory, meta["method"]):
            clip = load_clip(name, pretrained, text_tower=False, **options)
            method = load_scorer(directory, clip, backend=backend)
        if method is None:  # no head for this method: rebuild the prompts on the whole model
            clip = load_clip(name, pretrained, **options)
            method = load_method(directory, clip, backend=backend)
        return cls(clip, method)

    @property
    def class_names(self) -> list[str]:
        """The C in-distribution class names, in label order."""
        return self.method.class_names

    @property
    def uses_text_tower(self) -> bool:
        """True when the score needs the text tower (LSN with CoCoOp positive prompts), which is then loaded."""
        return self.clip.has_text_tower

    def score(self, features: Tensor, batch_size: int = 4096) -> tuple[Tensor, Tensor]:
        """OOD scores and predicted classes of image features.

        Args:
            features: ``[N, E]`` raw image features (``clip.encode_images``; normalised inside).
            batch_size: rows scored at once (the scores are per row, so the result does not depend on it).
        Returns:
            ``[N]`` float32 scores (higher = more ID) and ``[N]`` int64 class indices, on the CPU.
        """
        if features.ndim != 2 or features.shape[1] != self.clip.embed_dim:
            raise DataError(f"Detector: expected image features [N, {self.clip.embed_dim}], got "
                            f"{list(features.shape)}")
        _check_batch_size(batch_size)
        scores, predicted = [], []
        for part in features.split(batch_size):
            s, p = self.method.score(part.to(self.clip.device, torch.float32))
            scores.append(s.float().cpu())
            predicted.append(p.cpu())
        return torch.cat(scores), torch.cat(predicted)

    def features(self, images: Images, batch_size: int = 256, on_bad_image: str = "skip"
                 ) -> tuple[Tensor, list[str | None]]:
        """Image features ``[N, E]`` (fp32, CPU) of ``images`` and each row's image name (see :meth:`predict`)."""
        _check_batch_size(batch_size)
        if isinstance(images, Tensor):
            if images.shape[0] == 0:
                raise DataError("Detector: no images given (an empty tensor)")
            if images.ndim == 2:
                if images.shape[1] != self.clip.embed_dim:
                    raise DataError(f"Detector: image features must have width {self.clip.embed_dim} (the "
                                    f"model's), got {list(images.shape)}")
                return images.float().cpu(), [None] * len(images)
            if images.ndim == 4 and images.shape[1] == 3:
                rows = [self.clip.encode_images(part).cpu() for part in images.split(batch_size)]
                return torch.cat(rows), [None] * len(images)
            raise DataError(f"Detector: a tensor must hold features [B, {self.clip.embed_dim}] or preprocessed "
                            f"images [B, 3, H, W], got {list(images.shape)}")
        source = _image_source(images)
        result = extract_features(self.clip, source, batch_size=batch_size, device=self.clip.device,
                                  on_error=on_bad_image, progress=False, use_cache=False)
        return result.features, [source.describe(int(i)) for i in result.kept]

    def predict(self, images: Images, *, threshold: float | None = None, batch_size: int = 256,
                on_bad_image: str = "skip") -> list[Prediction]:
        """Score images and decide ID or OOD.

        Args:
            images: a path to an image or a folder (every image below it), a PIL image, a list of paths and PIL
                images, a ``[B, 3, H, W]`` tensor of images already transformed by ``clip.preprocess``, or a
                ``[B, E]`` tensor of image features.
            threshold: the decision threshold (default ``self.threshold``, the run's calibrated one).
            batch_size: images per image-tower pass.
            on_bad_image: ``"skip"`` leaves unreadable images out (a warning counts them), ``"fail"`` raises
                ``BadImageError`` naming the first.
        Returns:
            One :class:`Prediction` per readable image, in input order (a folder's: sorted paths).
        Raises:
            DataError: an empty input, a missing file, an input of another type or shape (one line, before any
                image is encoded).
        """
        features, names = self.features(images, batch_size, on_bad_image)
        return self.decide(features, names, threshold=threshold)

    def decide(self, features: Tensor, names: Sequence[str | None], *, threshold: float | None = None
               ) -> list[Prediction]:
        """Score image features ``[N, E]`` and decide ID or OOD: one :class:`Prediction` per row, named by
        ``names`` (N entries), at ``threshold`` (default ``self.threshold``; None decides ID for every image)."""
        scores, predicted = self.score(features)
        cut = self.threshold if threshold is None else float(threshold)
        values = scores.tolist()
        return [Prediction(name, value, cut is None or value >= cut, self.class_names[label])
                for name, value, label in zip(names, values, predicted.tolist(), strict=True)]

    def __repr__(self) -> str:
        tower = "image and text towers" if self.uses_text_tower else "image tower"
        return (f"Detector({self.method.name}, {len(self.class_names)} classes, {self.clip.name} "
                f"({self.clip.pretrained}), {tower}, threshold={self.threshold})")


def write_predictions(path: str | os.PathLike[str], predictions: Sequence[Prediction]) -> Path:
    """Write ``image,score,predicted_class,decision`` CSV rows, one per prediction, atomically (no partial file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "score", "predicted_class", "decision"])
        for p in predictions:
            writer.writerow([p.image, f"{p.score:.6g}", p.label, p.decision])
    return path


def _has_head(directory: str | os.PathLike[str], method: str) -> bool:
    """Whether ``prompts.safetensors`` holds text features written by ``method`` (read from its header only)."""
    try:
        with safe_open(str(Path(directory) / PROMPTS_FILE), framework="pt") as handle:
            written_by = (handle.metadata() or {}).get("method")
            return written_by == method and any(key.startswith(HEAD_PREFIX) for key in handle.keys())
    except (OSError, SafetensorError):  # load_method reports the unreadable file
        return False


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"Detector: batch_size must be an integer >= 1, got {batch_size!r}")


def _image_source(images: ImageInput | Sequence[ImageInput]) -> ImageSource:
    """The images of a folder, or of paths and PIL images, as an image source; checked before any is read."""
    if isinstance(images, (str, os.PathLike)) and Path(images).expanduser().is_dir():
        return ImageFolderSource(Path(images).expanduser(), labelled=False)
    items = [images] if isinstance(images, (str, os.PathLike, Image.Image)) else images
    if not isinstance(items, Sequence) or isinstance(items, (bytes, bytearray)):
        raise DataError(f"Detector: cannot read images from a {type(images).__name__}; give paths, PIL images, "
                        "a folder or a tensor")
    if not items:
        raise DataError("Detector: no images given (an empty list)")
    for i, item in enumerate(items):
        if isinstance(item, Image.Image):
            continue
        if not isinstance(item, (str, os.PathLike)):
            raise DataError(f"Detector: image {i} is a {type(item).__name__}; give paths or PIL images")
        if not Path(item).expanduser().is_file():
            raise DataError(f"Detector: no such image file: {item}")
    return _ImageList(list(items))


class _ImageList:
    """Paths and PIL images as an :class:`~promptkit.data.sources.ImageSource` (unlabelled)."""

    def __init__(self, items: list[ImageInput]) -> None:
        self.items = items
        self.labels = torch.full((len(items),), -1, dtype=torch.int64)
        self.class_names: list[str] = []

    def __len__(self) -> int:
        return len(self.items)

    def load(self, i: int) -> Image.Image:
        item = self.items[i]
        return to_rgb(item) if isinstance(item, Image.Image) else _open_image(Path(item).expanduser())

    def describe(self, i: int) -> str:
        item = self.items[i]
        if isinstance(item, Image.Image):
            return getattr(item, "filename", None) or f"<image {i}>"
        return os.fspath(item)

    def fingerprint(self) -> str:
        # never cached (predict extracts with use_cache=False); the key still needs a stable string
        return hashlib.sha256("\0".join(self.describe(i) for i in range(len(self))).encode()).hexdigest()
