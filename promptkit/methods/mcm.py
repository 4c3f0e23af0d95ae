"""MCM (Ming et al., NeurIPS 2022): zero-shot maximum concept matching, max_c softmax(cos / T)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from promptkit.methods.base import Method, TextFeatures, TrainingData
from promptkit.methods.shared import mcm_score_and_classify


@dataclass
class MCMConfig:
    template: str = "a photo of a {}"
    temperature: float = 1.0


class MCM(Method):
    """Zero-shot: hand-written prompts, no training."""

    name = "mcm"
    Config = MCMConfig
    training_data = TrainingData.NONE

    def _encode_text(self, local: bool) -> TextFeatures:
        return TextFeatures(self.clip.encode_texts([self.config.template.format(c) for c in self.class_names]))

    def _score(self, features: Tensor, text: TextFeatures) -> tuple[Tensor, Tensor]:
        return mcm_score_and_classify(features, text.id, self.config.temperature, self.backend)
