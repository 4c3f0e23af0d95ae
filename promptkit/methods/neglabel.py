"""NegLabel (Jiang et al., ICLR 2024): zero-shot OOD detection with mined negative labels.

NegMine (``promptkit.negmine``) picks the vocabulary words farthest from the ID labels; the score is
the ID probability mass of one softmax over the C ID and M negative label prompts at tau = 0.01, averaged
over 100 groups of negatives (a seeded CPU permutation). The mined labels are saved in the sidecar, so a
reload scores without mining again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F

from promptkit.methods.base import Method, TextFeatures, TrainingData
from promptkit.methods.shared import NegativeLabelScore
from promptkit.negmine import (
    ID_TEMPLATE,
    NegativeLabels,
    embed_words,
    load_vocabulary,
    mine_negative_labels,
    negative_labels_from_json,
)
from promptkit.ops.reference import GROUP_ORDERS


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


class NegLabel(NegativeLabelScore, Method):
    """Zero-shot: ID prompts "the nice {}" against mined negative-label prompts."""

    name = "neglabel"
    Config = NegLabelConfig
    training_data = TrainingData.NONE

    def prepare(self, cache_dir: str | None = None, progress: bool = True) -> None:
        """Mine the negative labels (word embeddings cached under ``cache_dir``) unless ``info`` has them."""
        if "negative_labels" not in self.info:
            c = self.config
            count, share = (c.num_negatives, None) if c.num_negatives is not None else (None, c.share)
            labels = mine_negative_labels(self.clip, self.class_names, load_vocabulary(c.vocabulary), count, share,
                                          c.percentile, cache_dir, progress)
            self.info["negative_labels"] = labels.to_json()

    def negative_labels(self) -> NegativeLabels:
        """The mined negative labels (the saved ones when reloaded)."""
        self.prepare(progress=False)
        return negative_labels_from_json(self.info["negative_labels"])

    def _encode_text(self, local: bool) -> TextFeatures:
        """ID [C, E] and negative-label [M, E] prompt features, L2-normalised."""
        id_text = embed_words(self.clip, self.class_names, ID_TEMPLATE, use_cache=False, progress=False)
        neg_text = self.clip.encode_texts(self.negative_labels().prompts())
        return TextFeatures(id_text, label_negatives=F.normalize(neg_text, dim=-1))
