"""NegLabel (Jiang et al., ICLR 2024): zero-shot OOD detection with mined negative labels.

NegMine (``promptkit.negmine``) picks the vocabulary words farthest from the ID labels; the score is
the ID probability mass of one softmax over the C ID and M negative label prompts at tau = 0.01, averaged
over 100 groups of negatives (a seeded CPU permutation). The mined labels are saved in the sidecar, so a
reload scores without mining again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import Tensor

from promptkit import ops
from promptkit.methods.base import Method
from promptkit.ops.reference import GROUP_ORDERS
from promptkit.negmine import (
    ID_TEMPLATE,
    NegativeLabels,
    embed_words,
    load_vocabulary,
    mine_negative_labels,
    negative_labels_from_json,
)


@dataclass
class NegLabelConfig:
    share: float = 0.15  # NegLabel's code: the lowest 15 % of each part of speech (about 10.7k of WordNet)
    num_negatives: int | None = None  # a fixed M instead (LAPT's proportional split), e.g. 10000
    percentile: float = 0.95
    vocabulary: str | None = None  # a word list file; None: the shipped WordNet list
    temperature: float = 0.01
    groups: int = 100  # capped at M
    group_seed: int = 0
    # the released code's; "permute-then-drop" (ops.neglabel_score)
    group_order: str = field(default="drop-then-permute", metadata={"choices": GROUP_ORDERS})


def grouped_neglabel_score(features: Tensor, id_text: Tensor, neg_text: Tensor, temperature: float, groups: int,
                           seed: int, backend: str, group_order: str = "drop-then-permute") -> tuple[Tensor, Tensor]:
    """NegLabel score [N] and the nearest ID class [N] of image features [N, E]; id_text [C, E], neg_text [M, E]."""
    id_text, neg_text = id_text.to(features), neg_text.to(features)
    groups = max(1, min(groups, neg_text.shape[0]))
    score = ops.neglabel_score(features, id_text, neg_text, temperature, groups, seed, backend=backend,
                               group_order=group_order)
    return score, ops.cosine_logits(features, id_text, backend=backend).argmax(dim=-1)


class NegLabel(Method):
    """Zero-shot: ID prompts "the nice {}" against mined negative-label prompts."""

    name = "neglabel"
    Config = NegLabelConfig
    trainable = False

    def mine(self, cache_dir: str | os.PathLike[str] | None = None, progress: bool = True) -> NegativeLabels:
        """The negative labels: from the saved metadata when reloaded, else mined (word embeddings cached)."""
        if "negative_labels" not in self.info:
            c = self.config
            count, share = (c.num_negatives, None) if c.num_negatives is not None else (None, c.share)
            labels = mine_negative_labels(self.clip, self.class_names, load_vocabulary(c.vocabulary), count, share,
                                          c.percentile, cache_dir, progress)
            self.info["negative_labels"] = labels.to_json()
        return negative_labels_from_json(self.info["negative_labels"])

    @torch.no_grad()
    def text_features(self) -> tuple[Tensor, Tensor]:
        """ID [C, E] and negative [M, E] label features (L2-normalised, computed once)."""
        if not hasattr(self, "_text"):
            negatives = self.mine()
            id_text = embed_words(self.clip, self.class_names, ID_TEMPLATE, use_cache=False, progress=False)
            neg_text = self.clip.encode_texts(negatives.prompts())
            self._text = id_text, neg_text / neg_text.norm(dim=-1, keepdim=True)
        return self._text

    def score(self, features: Tensor) -> tuple[Tensor, Tensor]:
        id_text, neg_text = self.text_features()
        c = self.config
        return grouped_neglabel_score(features, id_text, neg_text, c.temperature, c.groups, c.group_seed,
                                      self.backend, c.group_order)

    head_names = ("id", "negative")
