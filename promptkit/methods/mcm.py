"""MCM (Ming et al., NeurIPS 2022): zero-shot maximum concept matching, max_c softmax(cos / T)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from promptkit import ops
from promptkit.methods.base import Method


@dataclass
class MCMConfig:
    template: str = "a photo of a {}"
    temperature: float = 1.0


@torch.no_grad()
def score_and_classify(features: Tensor, text: Tensor, temperature: float, backend: str) -> tuple[Tensor, Tensor]:
    """MCM score [N] and the nearest class [N] of image features [N, E] against class prompts [C, E]."""
    text = text.to(features)
    score = ops.mcm_score(features, text, temperature, backend=backend)
    return score, ops.cosine_logits(features, text, backend=backend).argmax(dim=-1)


class MCM(Method):
    """Zero-shot: hand-written prompts, no training."""

    name = "mcm"
    Config = MCMConfig
    trainable = False

    def text_features(self) -> Tensor:
        """Raw text features [C, E] of the templated class names (computed once)."""
        if not hasattr(self, "_text"):
            self._text = self.clip.encode_texts([self.config.template.format(c) for c in self.class_names])
        return self._text

    def score(self, features: Tensor) -> tuple[Tensor, Tensor]:
        return score_and_classify(features, self.text_features(), self.config.temperature, self.backend)
