"""LAPT (Zhang et al., ECCV 2024): label-driven automated prompt tuning, no ID images needed.

1. NegMine picks M negative labels (LAPT's proportional noun/adjective split): M = 1000 to train, 10,000 to
   test (the shared negative context transfers to any label list).
2. The pipeline collects images for the C ID and M negative labels (``label_images``, ``promptkit.collect``) and calls
   ``fit(features, labels)`` with labels in [0, C + M).
3. Distribution-aware prompts: one shared n_ctx-token context for the ID labels, one for the negative labels,
   "[ctx] <label>.". Loss: soft cross-entropy over the C + M labels at CLIP's logit scale, on
   - cross-modal mixes, which replace the images: normalise(lam f + (1 - lam) g_y), g_y the frozen feature
     of the label in one of 7 templates drawn at random, lam ~ Beta(alpha, alpha) per batch, target y;
   - plus cross-distribution mixes: each ID sample with a random negative-labelled one of the batch and vice
     versa, normalise(lam f_a + (1 - lam) f_b), target s y_ood + (1 - s)(lam y_a + (1 - lam) y_b) with
     s = min(beta lam, 1). The label set has no separate OOD bucket, so y_ood is spread uniformly over the M
     negative labels (``ood_target="negatives"``; ``"uniform"``: over all C + M labels, as the official code
     does without an OOD bucket).
   Both mixings can be switched off (``cross_modal``, ``cross_distribution``). SGD Nesterov, cosine per step.
4. Score: the grouped NegLabel score on the learned prompts with the test negatives (100 groups, seed 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from promptkit import ops
from promptkit.clip import PromptLearner
from promptkit.distributed import encode_prompts
from promptkit.methods.base import LabelImages, Method, TextFeatures, TrainingData
from promptkit.methods.shared import NegativeLabelScore, Stage, clip_logit_scale, train_loop
from promptkit.negmine import (
    MINING_TEMPLATES,
    PERCENTILE_RULES,
    NegativeLabels,
    load_vocabulary,
    mine_negative_labels,
    negative_labels_from_json,
)
from promptkit.ops.reference import GROUP_ORDERS

# TIP-Adapter's templates: the frozen label features that cross-modal mixing draws from.
MIX_TEMPLATES = ("a bad photo of the {}.", "a {} in a video game.", "a origami {}.", "a photo of the small {}.",
                 "art of the {}.", "a photo of the large {}.", "itap of a {}.")
OOD_TARGETS = ("negatives", "uniform")


@dataclass
class LAPTConfig:
    compat: str = "paper"  # "official-code": the released mining and script (see PRESETS)
    n_ctx: int = 4
    train_negatives: int = 1000
    test_negatives: int = 10000
    percentile: float = 0.95
    # NegLabel's NegMine prompts (the paper); "lapt-code": with a final period
    mining_templates: str = field(default="neglabel", metadata={"choices": tuple(MINING_TEMPLATES)})
    # NegLabel's; "sorted-index": floor(0.95 C) of the sorted cosines (code)
    percentile_rule: str = field(default="quantile", metadata={"choices": PERCENTILE_RULES})
    vocabulary: str | None = None  # a word list file; None: the shipped WordNet list
    images_per_label: int = 16  # retrieval: top-k pool images per label
    cross_modal: bool = True
    cross_distribution: bool = True
    alpha: float = 1.0  # lam ~ Beta(alpha, alpha)
    beta: float = 0.3  # OOD share of a cross-distribution mix: min(beta * lam, 1)
    ood_target: str = "negatives"
    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-5
    temperature: float = 0.01  # test score
    groups: int = 100
    group_seed: int = 0
    group_order: str = field(default="drop-then-permute", metadata={"choices": GROUP_ORDERS})
    seed: int = 1

    # The released OpenOOD-VLM code: its mining templates and percentile index, and its script's mixing
    # (cross-modal only: cross-distribution mixing is off, beta = 0).
    PRESETS: ClassVar[dict] = {"compat": {
        "paper": {},
        "official-code": dict(mining_templates="lapt-code", percentile_rule="sorted-index", cross_distribution=False),
    }}

    def __post_init__(self) -> None:
        for name, allowed in (("compat", ("paper", "official-code")), ("mining_templates", tuple(MINING_TEMPLATES)),
                              ("percentile_rule", PERCENTILE_RULES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"lapt: {name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.ood_target not in OOD_TARGETS:
            raise ValueError(f"lapt: ood_target must be one of {OOD_TARGETS}, got {self.ood_target!r}")
        if self.train_negatives < 1 or self.test_negatives < 1:
            raise ValueError("lapt: train_negatives and test_negatives must be >= 1")
        if self.alpha <= 0 or self.beta < 0:
            raise ValueError(f"lapt: alpha must be > 0 and beta >= 0, got {self.alpha}, {self.beta}")


def cross_distribution_partners(labels: Tensor, num_id: int, generator: torch.Generator) -> Tensor | None:
    """For each sample, a random sample of the other side (ID label < num_id vs negative label) of the batch.
    labels [B] -> partner indices [B], or None when the batch lacks one side."""
    is_id = labels < num_id
    ids, negs = torch.nonzero(is_id).flatten(), torch.nonzero(~is_id).flatten()
    if len(ids) == 0 or len(negs) == 0:
        return None
    partner = torch.empty_like(labels)
    partner[ids] = negs[torch.randint(len(negs), (len(ids),), generator=generator)]
    partner[negs] = ids[torch.randint(len(ids), (len(negs),), generator=generator)]
    return partner


def cross_distribution_targets(targets: Tensor, partner: Tensor, lam: float, beta: float, num_id: int,
                               ood_target: str = "negatives") -> Tensor:
    """s y_ood + (1 - s)(lam y + (1 - lam) y[partner]), s = min(beta lam, 1). targets [B, N] -> [B, N].

    y_ood is uniform over the N - num_id negative labels (``"negatives"``) or over all N labels (``"uniform"``).
    """
    share = min(beta * lam, 1.0)
    ood = torch.zeros_like(targets[0])
    if ood_target == "negatives":
        ood[num_id:] = 1.0 / (targets.shape[1] - num_id)
    else:
        ood[:] = 1.0 / targets.shape[1]
    return share * ood + (1 - share) * (lam * targets + (1 - lam) * targets[partner])


class LAPT(NegativeLabelScore, Method):
    """Distribution-aware prompts learned on collected images of ID and mined negative labels."""

    name = "lapt"
    Config = LAPTConfig
    training_data = TrainingData.LABEL_IMAGES

    def __init__(self, clip, class_names, config=None, backend="auto"):
        super().__init__(clip, class_names, config, backend)
        self.id_prompts = PromptLearner(clip, self.class_names, n_ctx=self.config.n_ctx)
        # the negative learner starts on a placeholder word; negative_labels() gives it the training negatives
        self.neg_prompts = PromptLearner(clip, ["none"], n_ctx=self.config.n_ctx)

    # -- negative labels ----------------------------------------------------------------------------

    def prepare(self, cache_dir: str | None = None, progress: bool = True) -> None:
        """Mine the training (M=train_negatives) and test (M=test_negatives) negative labels (word embeddings
        cached under ``cache_dir``) unless ``info`` has them."""
        c = self.config
        if "negative_labels" not in self.info:
            vocabulary = load_vocabulary(c.vocabulary)
            mined = {split: mine_negative_labels(self.clip, self.class_names, vocabulary, count, None, c.percentile,
                                                 cache_dir, progress, MINING_TEMPLATES[c.mining_templates],
                                                 c.percentile_rule)
                     for split, count in (("train", c.train_negatives), ("test", c.test_negatives))}
            self.info["negative_labels"] = {split: labels.to_json() for split, labels in mined.items()}

    def negative_labels(self) -> tuple[NegativeLabels, NegativeLabels]:
        """The training and test negative labels (the saved ones when reloaded)."""
        self.prepare(progress=False)
        saved = self.info["negative_labels"]
        train, test = negative_labels_from_json(saved["train"]), negative_labels_from_json(saved["test"])
        if self.neg_prompts.class_names != list(train.words):
            self.neg_prompts.set_class_names(list(train.words))
        return train, test

    def label_images(self) -> LabelImages:
        """The C + M label texts that training images are collected for; label i of ``fit`` is text i."""
        train = self.negative_labels()[0]
        return LabelImages(self.class_names + list(train.words), self.config.images_per_label, train)

    # -- training -----------------------------------------------------------------------------------

    @torch.no_grad()
    def _mix_text_features(self, labels: list[str]) -> Tensor:
        """Frozen, L2-normalised features [L, T, E] of every label in the T mixing templates."""
        texts = [t.format(label) for label in labels for t in MIX_TEMPLATES]
        features = self.clip.encode_texts(texts).float()
        return F.normalize(features, dim=-1).reshape(len(labels), len(MIX_TEMPLATES), -1)

    def _fit(self, features: Tensor, labels: Tensor, progress: bool) -> None:
        c = self.config
        self.prepare(progress=progress)
        train, _ = self.negative_labels()
        num_id, num_labels = len(self.class_names), len(self.class_names) + len(train)
        if len(labels) == 0 or int(labels.min()) < 0 or int(labels.max()) >= num_labels:
            raise ValueError(f"lapt: training labels must lie in [0, C+M={num_labels}) (ID classes, then the "
                             "mined negatives), got an empty or out-of-range label tensor")
        device = self.clip.device
        features = F.normalize(features.to(device).float(), dim=-1)
        labels = labels.to(device)
        mix_text = self._mix_text_features(self.class_names + list(train.words)) if c.cross_modal else None
        scale = clip_logit_scale(self.clip)
        rng = np.random.default_rng(c.seed)  # lam draws
        generator = torch.Generator().manual_seed(c.seed + 1)  # template and partner draws
        parameters = [self.id_prompts.ctx, self.neg_prompts.ctx]
        stage = Stage(c.epochs, c.batch_size, c.lr, c.momentum, c.weight_decay, nesterov=True, per_step=True)
        optimizer = stage.sgd(parameters)
        scheduler = stage.scheduler(optimizer, len(labels))
        counts = {"cross_distribution_batches": 0, "batches": 0}

        def loss_fn(index: Tensor) -> Tensor:
            image, target = features[index], F.one_hot(labels[index], num_labels).float()
            text = torch.cat([encode_prompts(self.id_prompts)[0], encode_prompts(self.neg_prompts)[0]])
            if mix_text is not None:
                lam = float(rng.beta(c.alpha, c.alpha))
                pick = torch.randint(len(MIX_TEMPLATES), (len(index),), generator=generator).to(device)
                image_or_mix = ops.mix_features(image, mix_text[labels[index], pick], lam, backend=self.backend)
            else:
                image_or_mix = image
            loss = ops.soft_cross_entropy(image_or_mix, text, target, scale, backend=self.backend)
            counts["batches"] += 1
            partner = cross_distribution_partners(labels[index].cpu(), num_id, generator) \
                if c.cross_distribution else None
            if partner is not None:
                lam = float(rng.beta(c.alpha, c.alpha))
                partner = partner.to(device)
                mixed = ops.mix_features(image, image[partner], lam, backend=self.backend)
                mixed_target = cross_distribution_targets(target, partner, lam, c.beta, num_id, c.ood_target)
                loss = loss + ops.soft_cross_entropy(mixed, text, mixed_target, scale, backend=self.backend)
                counts["cross_distribution_batches"] += 1
            return loss

        self.info["loss"] = train_loop(loss_fn, parameters, optimizer, len(labels), c.epochs, c.batch_size, c.seed,
                                       "lapt", progress, scheduler, stage.step_scheduler)
        self.info.update(counts, train_images={"id": int((labels < num_id).sum()),
                                               "negative": int((labels >= num_id).sum())})

    # -- scoring ----------------------------------------------------------------------------------

    def _encode_text(self, local: bool) -> TextFeatures:
        """Learned ID prompt features [C, E] and test negative-label prompt features [M_test, E]. Encoded in this
        process (the 10,000 test labels in chunks of 1,024)."""
        train, test = self.negative_labels()
        try:
            self.neg_prompts.set_class_names(list(test.words))
            chunks = [self.neg_prompts(classes=part)[0] for part in torch.arange(len(test)).split(1024)]
        finally:
            self.neg_prompts.set_class_names(list(train.words))
        return TextFeatures(self.id_prompts()[0], label_negatives=torch.cat(chunks))

    def state(self) -> dict[str, Tensor]:
        return {"id_ctx": self.id_prompts.ctx, "negative_ctx": self.neg_prompts.ctx}
