"""LSN, "Learn to Say No" (Nie et al., ICLR 2024): class-wise negative prompts next to a CoOp positive prompt.

Stage 1 learns a shared positive context (CoOp). Stage 2 learns K sets of class-specific negative contexts with
the negative loss (Eq. 5-6) plus lambda times the semantic orthogonality loss (Eq. 7). The sets are trained in
turn, one epoch each (as the official code does): while set k trains, the other sets' text features are
computed once and held fixed, so each step encodes only the C prompts being learned.
Test score (Eq. 13-14): S_MCM(T) - mean_k S_MinCM_k(neg_T).

Shots: the paper says negative prompts "benefit from a large number of training samples" and uses "a relatively
large number" (Appendix D, J) without the count; the released code trains on 128 images per class
(``train_data_128`` in ``main_feature_100_upload.py``), so ``LSN.default_shots`` is 128.

``positive_learner="cocoop"`` learns the positive prompt the CoCoOp way (a 4-token context shifted per image by a
meta-net), LSN's "CoCoOp+LSN" variant; its MCM term is then computed per image. It also selects Appendix D.0.2's
CoCoOp schedule for both stages: 10 epochs at batch 1 (positive and negatives), 4 context tokens.

``compat="official-code"`` switches to the released code (``main_feature_100_upload.py``): positive SGD lr 1e-3
with the cross-entropy taken of softmax(100 cos) (a double softmax), negative Adam lr 2e-3 with the same double
softmax on 20 (1 - cos), the orthogonality term of the code (``ortho="code"``: for the set being trained, the
mean over classes of (cos to set j + cos to set l) / 2 with the signed cosine, weight 1; in the paper's Eq. 7
units that is 2C times weaker than lambda = 1 on sum |cos|) and the test score MCM + mean_k max_c
softmax((1 - cos) / 5) (``score_rule="official"``). Presets are applied before the user's ``--set`` values,
which always win.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from promptkit import ops
from promptkit.clip import ConditionalPromptLearner, PromptLearner
from promptkit.distributed import encode_prompts
from promptkit.methods.base import Method, TextFeatures
from promptkit.methods.shared import PromptFit, Stage, clip_logit_scale, cosine_lr, encode, fit_by_cross_entropy, \
    fit_positive_prompts, mcm_score_and_classify, train_loop

COMPAT = ("paper", "official-code")
ORTHO_FORMS = ("paper", "code")


@dataclass
class LSNConfig:
    compat: str = "paper"
    # stage 1: positive prompt. "coop": shared context; "cocoop": 4 tokens from "a photo of a" shifted per image
    # by a meta-net (with CoCoOp's schedule, see PRESETS)
    positive_learner: str = "coop"
    n_ctx: int = 16
    pos_epochs: int = 50
    pos_batch_size: int = 8
    pos_lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    pos_double_softmax: bool = False  # the released code: cross-entropy of softmax(100 cos)
    # stage 2: K sets of class-specific negative prompts
    n_neg_ctx: int = 16
    n_sets: int = 3
    neg_epochs: int = 100
    neg_batch_size: int = 8
    neg_lr: float = 1e-3
    neg_temperature_train: float = 0.05
    # "paper": Eq. 7, sum over pairs of |cos|; "code": the released code's signed mean
    ortho: str = field(default="paper", metadata={"choices": ORTHO_FORMS})
    ortho_weight: float = 0.1
    double_softmax: bool = False
    # test score
    temperature: float = 1.0
    neg_temperature: float = 5.0
    # "paper": MCM - MinCM; "official": MCM + mean_k max softmax((1 - cos) / neg_T)
    score_rule: str = field(default="paper", metadata={"choices": ("paper", "official")})
    cache_frozen_text: bool = True  # encode the other sets once per set switch (False: every step)
    seed: int = 1

    PRESETS: ClassVar[dict] = {
        "compat": {
            "paper": {},
            "official-code": dict(pos_lr=1e-3, pos_double_softmax=True, neg_lr=2e-3, double_softmax=True,
                                  ortho="code", ortho_weight=1.0, score_rule="official"),
        },
        "positive_learner": {
            "coop": {},
            "cocoop": dict(n_ctx=4, pos_epochs=10, pos_batch_size=1, neg_epochs=10, neg_batch_size=1),
        },
    }

    def __post_init__(self) -> None:
        for name, allowed in (("compat", COMPAT), ("positive_learner", ("coop", "cocoop")), ("ortho", ORTHO_FORMS),
                              ("score_rule", ("paper", "official"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"lsn: {name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")


class LSN(Method):
    """Positive CoOp prompt + K sets of class-specific negative prompts."""

    name = "lsn"
    Config = LSNConfig
    default_shots = 128  # the released code's; the paper asks for "a relatively large number" (Appendix J)
    text_kinds = ("id", "class_negatives")
    conditional = None  # what a scorer rebuilt from a saved head (Method.from_head) sees: no CoCoOp prompts

    def __init__(self, clip, class_names, config=None, backend="auto"):
        super().__init__(clip, class_names, config, backend)
        c = self.config
        if c.positive_learner == "cocoop":
            self.conditional = ConditionalPromptLearner(clip, self.class_names, c.n_ctx)
            self.positive_prompts = self.conditional.prompts
        else:
            self.positive_prompts = PromptLearner(clip, self.class_names, n_ctx=c.n_ctx)
        self.negative_prompts = PromptLearner(clip, self.class_names, n_ctx=c.n_neg_ctx, n_sets=c.n_sets,
                                              class_specific=True)

    @property
    def scores_from_text_features(self) -> bool:
        """False with the CoCoOp positive, whose prompts depend on each image: its score needs the text tower."""
        return self.conditional is None

    def _fit(self, features: Tensor, labels: Tensor, progress: bool) -> None:
        c = self.config
        stage = Stage(c.pos_epochs, c.pos_batch_size, c.pos_lr, c.momentum, c.weight_decay)
        if self.conditional is not None:
            # CoCoOp: cross-entropy of logit_scale * cos(image, its own prompts), context and meta-net learned
            scale = clip_logit_scale(self.clip)
            run = PromptFit(stage, c.seed, self.backend, "lsn positive (cocoop)", progress)
            self.info["positive_loss"] = fit_by_cross_entropy(
                list(self.conditional.parameters()),
                lambda index: scale * _per_image_cosines(features[index], self.conditional(features[index])),
                labels, run, c.pos_double_softmax)
        else:
            run = PromptFit(stage, c.seed, self.backend, "lsn positive", progress)
            self.info["positive_loss"] = fit_positive_prompts(self.positive_prompts, features, labels,
                                                              clip_logit_scale(self.clip), run, c.pos_double_softmax)
        self.info["negative_loss"] = self._fit_negatives(features, labels, progress)

    def _negative_loss(self, image: Tensor, neg_text: Tensor, labels: Tensor) -> Tensor:
        c = self.config
        if c.double_softmax:  # the released code feeds softmax outputs to cross_entropy
            logits = (1 - ops.cosine_logits(image, neg_text, backend=self.backend)) / c.neg_temperature_train
            return F.cross_entropy(torch.softmax(logits, dim=-1), labels)
        return ops.lsn_negative_loss(image, neg_text, labels, c.neg_temperature_train, backend=self.backend)

    def _fit_negatives(self, features: Tensor, labels: Tensor, progress: bool) -> list[list[float]]:
        c = self.config
        negative = self.negative_prompts
        ctx = negative.ctx  # [K, C, n_ctx, W]
        optimizers = [torch.optim.Adam([ctx], lr=c.neg_lr) for _ in range(c.n_sets)]
        schedulers = [cosine_lr(opt, c.neg_epochs) for opt in optimizers]
        history: list[list[float]] = [[] for _ in range(c.n_sets)]
        for epoch in tqdm(range(c.neg_epochs), desc="lsn negatives", disable=not progress, leave=False):
            for k in range(c.n_sets):
                with torch.no_grad():  # the other sets' features, fixed while set k trains
                    frozen = encode_prompts(negative).detach()  # [K, C, E]

                def loss_fn(index: Tensor, k: int = k, frozen: Tensor = frozen) -> Tensor:
                    if not c.cache_frozen_text:
                        with torch.no_grad():
                            frozen = encode_prompts(negative)
                    current = encode_prompts(negative, sets=[k])[0]  # [C, E]
                    loss = self._negative_loss(features[index], current, labels[index])
                    if c.ortho == "code":
                        ortho = code_orthogonality(current, torch.cat([frozen[:k], frozen[k + 1:]]))
                    else:
                        sets = torch.cat([frozen[:k], current[None], frozen[k + 1:]])
                        ortho = ops.orthogonality_loss(sets.transpose(0, 1), "abs_sum", backend=self.backend)
                    return loss + c.ortho_weight * ortho

                # Only slice k of ctx receives gradient, so optimizer k (its own Adam state) moves set k alone.
                history[k] += train_loop(loss_fn, [ctx], optimizers[k], len(features), 1, c.neg_batch_size,
                                         c.seed * 1000 + epoch * c.n_sets + k, f"lsn negatives set {k}",
                                         progress=False)
                schedulers[k].step()
        return history

    def _encode_text(self, local: bool) -> TextFeatures:
        """Positive [C, E] (with CoCoOp: without the per-image shift) and negative [C, K, E] prompts."""
        return TextFeatures(encode(self.positive_prompts, local)[0],
                            class_negatives=encode(self.negative_prompts, local).transpose(0, 1))

    def _score(self, features: Tensor, text: TextFeatures) -> tuple[Tensor, Tensor]:
        if self.conditional is not None:
            return self._conditional_score(features, text.class_negatives)
        c = self.config
        if c.score_rule == "official":
            mcm, predicted = mcm_score_and_classify(features, text.id, c.temperature, self.backend)
            return mcm + self._official_negative_term(features, text.class_negatives), predicted
        score = ops.lsn_score(features, text.id, text.class_negatives, c.temperature, c.neg_temperature,
                              backend=self.backend)
        return score, ops.cosine_logits(features, text.id, backend=self.backend).argmax(dim=-1)

    def _official_negative_term(self, features: Tensor, neg: Tensor) -> Tensor:
        """The released score's negative term: mean_k max_c softmax(-cos / neg_T), which is the MCM of the negated
        negative prompts at neg_T. features [B, E], neg [C, K, E] -> [B]."""
        return torch.stack([ops.mcm_score(features, -neg[:, k], self.config.neg_temperature, backend=self.backend)
                            for k in range(neg.shape[1])]).mean(dim=0)

    def _conditional_score(self, features: Tensor, neg: Tensor, chunk: int = 256) -> tuple[Tensor, Tensor]:
        """The LSN score with CoCoOp positives: each image has its own C prompts, so MCM is computed per image.

        The shared-text ops do not apply to per-image prompts: that MCM term is plain torch, in chunks of images;
        the negative term is the op's (the negatives are shared).
        """
        c = self.config
        scores, predicted = [], []
        for part in features.split(chunk):
            cos = _per_image_cosines(part, self.conditional(part).to(part))  # [b, C]
            mcm = torch.softmax(cos / c.temperature, dim=-1).amax(dim=-1)
            if c.score_rule == "official":
                scores.append(mcm + self._official_negative_term(part, neg))
            else:
                scores.append(mcm - ops.min_concept_score(part, neg, c.neg_temperature, backend=self.backend))
            predicted.append(cos.argmax(dim=-1))
        return torch.cat(scores), torch.cat(predicted)

    def state(self) -> dict[str, Tensor]:
        state = {"positive_ctx": self.positive_prompts.ctx, "negative_ctx": self.negative_prompts.ctx}
        if self.conditional is not None:
            state.update({f"meta_net.{k}": v for k, v in self.conditional.meta_net.state_dict().items()})
        return state


def code_orthogonality(current: Tensor, others: Tensor) -> Tensor:
    """The released code's orthogonality term for the set being trained: the mean over the C classes of
    (sum over the other sets j of cos(current_c, others_jc)) / 2, with the signed cosine.

    current [C, E] (the set being learned), others [K-1, C, E] (the other sets, held fixed) -> scalar.
    """
    return F.cosine_similarity(current[None], others, dim=-1).sum(dim=0).mean() / 2


def _per_image_cosines(image: Tensor, text: Tensor) -> Tensor:
    """cos(image_b, text_bc): image [B, E], per-image prompts text [B, C, E] -> [B, C]."""
    return torch.einsum("be,bce->bc", F.normalize(image, dim=-1), F.normalize(text, dim=-1))
