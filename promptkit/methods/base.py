"""The Method contract: what an OOD method on a frozen CLIP declares and implements.

The pipeline, the CLI and the detector read only this contract; they never name a method. A method declares
what it learns from (``training_data``) and implements the hooks below; the base class keeps the derived text
features (computed once, forgotten after ``fit`` and ``load_state``). Saving and loading live in
``promptkit.methods.saved``, settings in ``promptkit.methods.config``, helpers several methods use in
``promptkit.methods.shared``.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from promptkit.methods.config import resolve_config
from promptkit.methods.saved import write_prompts
from promptkit.version import __version__

if TYPE_CHECKING:
    from promptkit.negmine import NegativeLabels


class TrainingData(enum.Enum):
    """What a method learns from; the pipeline provides it."""

    NONE = "none"  # zero-shot: fit() is not called; --train images, if given, only calibrate the threshold
    ID_IMAGES = "id-images"  # few-shot labelled ID images (--train), labels in [0, C)
    LABEL_IMAGES = "label-images"  # images collected for label_images().labels, labels index that list


@dataclass(frozen=True)
class LabelImages:
    """The images a ``TrainingData.LABEL_IMAGES`` method asks for: ``per_label`` images of each label text.
    ``labels`` holds the C ID class names first, then the labels outside them (LAPT: its mined negative labels);
    label i of ``fit`` is ``labels[i]``."""

    labels: list[str]
    per_label: int
    negatives: NegativeLabels | None = None  # the mined negative labels among them (collect writes their list)


@dataclass(frozen=True)
class TextFeatures:
    """The raw (not normalised) text features a method scores with: one shape per kind.

    Attributes:
        id: ``[C, E]`` one prompt per ID class.
        class_negatives: ``[C, K, E]`` K negative prompts of each ID class (LSN, NegPrompt), or None.
        label_negatives: ``[M, E]`` prompts of M negative labels shared by all classes (NegLabel, LAPT), or None.
    """

    id: Tensor
    class_negatives: Tensor | None = None
    label_negatives: Tensor | None = None

    def parts(self) -> dict[str, Tensor]:
        """The kinds present, by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def like(self, features: Tensor) -> TextFeatures:
        """The same features in the dtype and on the device of ``features``."""
        return TextFeatures(**{name: t.to(features) for name, t in self.parts().items()})


class Method:
    """An OOD detector on a frozen CLIP: ``fit`` on image features, ``score`` new ones (higher = more ID).

    A subclass sets ``name``, ``Config`` (a dataclass whose defaults are the paper's), ``training_data``,
    ``text_kinds`` (the ``TextFeatures`` kinds it fills) and, when it trains, ``default_shots``; it implements
    ``_encode_text`` and ``_score``, ``_fit`` when it learns, ``state`` when it has learned tensors, and
    ``prepare`` / ``label_images`` when it needs them.
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    training_data: ClassVar[TrainingData] = TrainingData.ID_IMAGES
    # Training images per class of the paper's main table (``--shots`` overrides it; 0: all images).
    default_shots: ClassVar[int] = 16
    text_kinds: ClassVar[tuple[str, ...]] = ("id",)

    def __init__(self, clip, class_names: list[str], config: Any = None, backend: str = "auto") -> None:
        self._setup(clip, class_names, config, backend)
        if hasattr(self.config, "seed"):  # the subclass draws its prompt initialisation from torch's generator
            torch.manual_seed(self.config.seed)

    def _setup(self, clip, class_names: list[str], config: Any, backend: str) -> None:
        if not class_names:
            raise ValueError(f"{self.name}: the class list is empty; give at least one in-distribution class")
        self.clip = clip
        self.class_names = list(class_names)
        self.config = config if config is not None else resolve_config(self.Config)
        self.backend = backend
        self.threshold: float | None = None
        self.info: dict[str, Any] = {}
        self._text: TextFeatures | None = None

    # -- the hooks ----------------------------------------------------------------------------------

    def prepare(self, cache_dir: str | None = None, progress: bool = True) -> None:
        """Derive what the method needs from the model before training, caching it under ``cache_dir``
        (NegLabel and LAPT mine their negative labels). Idempotent; reloaded methods have it in ``info``."""

    def label_images(self) -> LabelImages:
        """The labels to collect training images for (``TrainingData.LABEL_IMAGES`` methods)."""
        raise NotImplementedError(f"{self.name} does not learn from images collected per label")

    def _fit(self, features: Tensor, labels: Tensor, progress: bool) -> None:
        raise NotImplementedError(f"{self.name} is zero-shot: it has nothing to fit")

    def _encode_text(self, local: bool) -> TextFeatures:
        """The text features of the current prompts. ``local``: computed in this process alone (``save`` runs on
        one rank only); else the text-encoder work may be split over torchrun ranks, which all call it."""
        raise NotImplementedError

    def _score(self, features: Tensor, text: TextFeatures) -> tuple[Tensor, Tensor]:
        """Scores [N] and predicted classes [N] of image features [N, E], with ``text`` in their dtype/device."""
        raise NotImplementedError

    def state(self) -> dict[str, Tensor]:
        """The learned tensors that ``save`` stores, by name (the live tensors, so ``load_state`` fills them)."""
        return {}

    @property
    def scores_from_text_features(self) -> bool:
        """Whether ``score`` needs only ``text_features()`` (then a deployed detector needs no text tower)."""
        return True

    # -- what the pipeline calls ------------------------------------------------------------------------

    def fit(self, features: Tensor, labels: Tensor, progress: bool = True) -> Method:
        """Learn from image features [N, E] with labels [N] (int64, indices into the class or label list)."""
        self._fit(features, labels, progress)
        self._text = None
        return self

    def text_features(self) -> TextFeatures:
        """The text features ``score`` uses, computed once (again after ``fit`` or ``load_state``)."""
        if self._text is None:
            with torch.no_grad():
                self._text = self._encode_text(local=False)
        return self._text

    def score(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """OOD score [N] (higher = more in-distribution) and predicted class [N] for image features [N, E]."""
        with torch.no_grad():
            return self._score(features, self.text_features().like(features))

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        """Copy saved tensors (names and shapes as ``state()``'s) into the learned ones."""
        with torch.no_grad():
            for name, tensor in self.state().items():
                tensor.copy_(tensors[name])
        self._text = None

    def metadata(self) -> dict[str, Any]:
        """The ``prompts.json`` fields that describe the method (``save`` adds the format and the checksum)."""
        return {
            "method": self.name,
            "config": dataclasses.asdict(self.config),
            "model": self.clip.describe(),
            "class_names": self.class_names,
            "threshold": self.threshold,
            "info": self.info,
            "promptkit_version": __version__,
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the learned tensors, the head and ``prompts.json`` into ``directory`` as one atomic step
        (``promptkit.methods.saved``; ``promptkit.methods.load_method`` reads them back)."""
        head = self.head()
        return write_prompts(directory, self.name, self.state(), head.parts() if head is not None else {},
                             self.metadata())

    def head(self) -> TextFeatures | None:
        """The text features to save beside the prompts for deployment (None when the score needs the text
        tower): the ones already computed, else computed in this process alone."""
        if not self.scores_from_text_features:
            return None
        if self._text is not None:
            return self._text
        with torch.no_grad():
            return self._encode_text(local=True)

    @classmethod
    def from_head(cls, clip, class_names: list[str], config: Any, head: dict[str, Tensor],
                  backend: str = "auto") -> Method:
        """The method scoring with saved text features ``head`` (by kind, as ``head().parts()`` gave them): ``clip``
        may be an image-only model; ``fit``
        and ``state`` do not work. The subclass's ``__init__``, which builds prompt learners on the text
        tower, is not run."""
        method = cls.__new__(cls)
        method._setup(clip, class_names, config, backend)
        method._text = TextFeatures(**head)
        return method
