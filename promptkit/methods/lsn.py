"""LSN, "Learn to Say No" (Nie et al., ICLR 2024): class-wise negative prompts next to a CoOp positive prompt.

Stage 1 learns a shared positive context (CoOp). Stage 2 learns K sets of class-specific negative contexts with
the negative loss (Eq. 5-6) plus lambda times the semantic orthogonality loss (Eq. 7). The sets are trained in
turn, one epoch each (as the official code does): while set k trains, the other sets' text features are
computed once and held fixed, so each step encodes only the C prompts being learned.
Test score (Eq. 13-14): S_MCM(T) - mean_k S_MinCM_k(neg_T).

``positive="cocoop"`` learns the positive prompt the CoCoOp way (a 4-token context shifted per image by a
meta-net), LSN's "CoCoOp+LSN" variant; its MCM term is then computed per image.

``compat="official-code"`` switches to the released code's choices: lambda = 1, negative lr 2e-3, cross-entropy
on already-softmaxed logits (a double softmax), and the test score MCM + mean_k max_c softmax((1 - cos) / 5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from promptkit import ops
from promptkit.clip import ConditionalPromptLearner, PromptLearner
from promptkit.distributed import encode_prompts
from promptkit.methods.base import Method, cosine_lr, train_loop
from promptkit.methods.coop import clip_logit_scale, fit_positive_prompts
from promptkit.methods.mcm import score_and_classify

COMPAT = ("paper", "official-code")


@dataclass
class LSNConfig:
    compat: str = "paper"
    # stage 1: positive prompt. "coop": shared context; "cocoop": 4 tokens from "a photo of a" shifted per image
    # by a meta-net (then, unless set, 10 epochs at batch 1, LSN's CoCoOp setting)
    positive: str = "coop"
    n_ctx: int = 16
    pos_epochs: int = 50
    pos_batch_size: int = 8
    pos_lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # stage 2: K sets of class-specific negative prompts
    n_neg_ctx: int = 16
    n_sets: int = 3
    neg_epochs: int = 100
    neg_batch_size: int = 8
    neg_lr: float = 1e-3
    neg_temperature_train: float = 0.05
    ortho_weight: float = 0.1
    double_softmax: bool = False
    # test score
    temperature: float = 1.0
    neg_temperature: float = 5.0
    score: str = "paper"  # "paper": MCM - MinCM; "official": MCM + mean_k max softmax((1 - cos) / neg_T)
    cache_frozen_text: bool = True  # encode the other sets once per set switch (False: every step)
    seed: int = 1

    def __post_init__(self) -> None:
        if self.compat not in COMPAT:
            raise ValueError(f"lsn: compat must be one of {COMPAT}, got {self.compat!r}")
        if self.compat == "official-code":
            self.ortho_weight, self.neg_lr, self.double_softmax, self.score = 1.0, 2e-3, True, "official"
        if self.score not in ("paper", "official"):
            raise ValueError(f"lsn: score must be 'paper' or 'official', got {self.score!r}")
        if self.positive not in ("coop", "cocoop"):
            raise ValueError(f"lsn: positive must be 'coop' or 'cocoop', got {self.positive!r}")
        if self.positive == "cocoop":  # CoCoOp's own settings where the CoOp defaults are still in place
            defaults = {"pos_epochs": (50, 10), "pos_batch_size": (8, 1), "n_ctx": (16, 4)}
            for name, (coop_value, cocoop_value) in defaults.items():
                if getattr(self, name) == coop_value:
                    setattr(self, name, cocoop_value)


class LSN(Method):
    """Positive CoOp prompt + K sets of class-specific negative prompts."""

    name = "lsn"
    Config = LSNConfig

    def __init__(self, clip, class_names, config=None, backend="auto"):
        super().__init__(clip, class_names, config, backend)
        c = self.config
        torch.manual_seed(c.seed)
        self.conditional = ConditionalPromptLearner(clip, self.class_names, c.n_ctx) if c.positive == "cocoop" \
            else None
        self.positive = self.conditional.prompts if self.conditional else PromptLearner(clip, self.class_names,
                                                                                        n_ctx=c.n_ctx)
        self.negative = PromptLearner(clip, self.class_names, n_ctx=c.n_neg_ctx, n_sets=c.n_sets,
                                      class_specific=True)

    def fit(self, features: Tensor, labels: Tensor, progress: bool = True) -> "LSN":
        c = self.config
        if self.conditional is not None:
            self.info["positive_loss"] = self._fit_conditional(features, labels, progress)
        else:
            self.info["positive_loss"] = fit_positive_prompts(
                self.positive, self.clip, features, labels, c.pos_epochs, c.pos_batch_size, c.pos_lr, c.momentum,
                c.weight_decay, 0, c.seed, self.backend, progress, "lsn positive")
        self.info["negative_loss"] = self._fit_negatives(features, labels, progress)
        return self

    def _fit_conditional(self, features: Tensor, labels: Tensor, progress: bool) -> list[float]:
        """CoCoOp: cross-entropy of logit_scale * cos(image, its own prompts), context and meta-net learned."""
        c = self.config
        parameters = list(self.conditional.parameters())
        optimizer = torch.optim.SGD(parameters, lr=c.pos_lr, momentum=c.momentum, weight_decay=c.weight_decay)
        scheduler = cosine_lr(optimizer, c.pos_epochs)
        scale = clip_logit_scale(self.clip)

        def loss_fn(index: Tensor) -> Tensor:
            image = features[index]
            logits = scale * _per_image_cosines(image, self.conditional(image))
            return F.cross_entropy(logits, labels[index])

        return train_loop(loss_fn, parameters, optimizer, len(features), c.pos_epochs, c.pos_batch_size, c.seed,
                          "lsn positive (cocoop)", progress, scheduler)

    def _negative_loss(self, image: Tensor, neg_text: Tensor, labels: Tensor) -> Tensor:
        c = self.config
        if c.double_softmax:  # the released code feeds softmax outputs to cross_entropy
            logits = (1 - ops.cosine_logits(image, neg_text, backend=self.backend)) / c.neg_temperature_train
            return F.cross_entropy(torch.softmax(logits, dim=-1), labels)
        return ops.lsn_negative_loss(image, neg_text, labels, c.neg_temperature_train, backend=self.backend)

    def _fit_negatives(self, features: Tensor, labels: Tensor, progress: bool) -> list[list[float]]:
        c = self.config
        ctx = self.negative.ctx  # [K, C, n_ctx, W]
        optimizers = [torch.optim.Adam([ctx], lr=c.neg_lr) for _ in range(c.n_sets)]
        schedulers = [cosine_lr(opt, c.neg_epochs) for opt in optimizers]
        history: list[list[float]] = [[] for _ in range(c.n_sets)]
        for epoch in tqdm(range(c.neg_epochs), desc="lsn negatives", disable=not progress, leave=False):
            for k in range(c.n_sets):
                with torch.no_grad():  # the other sets' features, fixed while set k trains
                    frozen = encode_prompts(self.negative).detach()  # [K, C, E]

                def loss_fn(index: Tensor, k: int = k, frozen: Tensor = frozen) -> Tensor:
                    if not c.cache_frozen_text:
                        with torch.no_grad():
                            frozen = encode_prompts(self.negative)
                    current = encode_prompts(self.negative, sets=[k])[0]  # [C, E]
                    sets = torch.cat([frozen[:k], current[None], frozen[k + 1:]])
                    loss = self._negative_loss(features[index], current, labels[index])
                    ortho = ops.orthogonality_loss(sets.transpose(0, 1), "abs_sum", backend=self.backend)
                    return loss + c.ortho_weight * ortho

                # Only slice k of ctx receives gradient, so optimizer k (its own Adam state) moves set k alone.
                history[k] += train_loop(loss_fn, [ctx], optimizers[k], len(features), 1, c.neg_batch_size,
                                         c.seed * 1000 + epoch * c.n_sets + k, f"lsn negatives set {k}",
                                         progress=False)
                schedulers[k].step()
        return history

    @torch.no_grad()
    def text_features(self) -> tuple[Tensor, Tensor]:
        """Positive [C, E] and negative [C, K, E] raw text features."""
        return encode_prompts(self.positive)[0], encode_prompts(self.negative).transpose(0, 1)

    @torch.no_grad()
    def score(self, features: Tensor) -> tuple[Tensor, Tensor]:
        c = self.config
        pos, neg = (t.to(features) for t in self.text_features())
        if self.conditional is not None:
            return self._conditional_score(features, neg)
        mcm, predicted = score_and_classify(features, pos, c.temperature, self.backend)
        if c.score == "official":
            # max_c softmax(-cos / neg_T) is the MCM of the negated negative prompts at neg_T.
            extra = torch.stack([ops.mcm_score(features, -neg[:, k], c.neg_temperature, backend=self.backend)
                                 for k in range(neg.shape[1])]).mean(dim=0)
            return mcm + extra, predicted
        score = ops.lsn_score(features, pos, neg, c.temperature, c.neg_temperature, backend=self.backend)
        return score, predicted

    def _conditional_score(self, features: Tensor, neg: Tensor, chunk: int = 256) -> tuple[Tensor, Tensor]:
        """The LSN score with CoCoOp positives: each image has its own C prompts, so MCM is computed per image.

        The shared-text ops do not apply to per-image prompts; this path is plain torch, in chunks of images.
        """
        c = self.config
        scores, predicted = [], []
        for part in features.split(chunk):
            cos = _per_image_cosines(part, self.conditional(part).to(part))  # [b, C]
            mcm = torch.softmax(cos / c.temperature, dim=-1).amax(dim=-1)
            if c.score == "official":
                extra = torch.stack([ops.mcm_score(part, -neg[:, k], c.neg_temperature, backend=self.backend)
                                     for k in range(neg.shape[1])]).mean(dim=0)
                scores.append(mcm + extra)
            else:
                min_cm = torch.stack([
                    torch.softmax(ops.cosine_logits(part, neg[:, k], backend=self.backend) / c.neg_temperature,
                                  dim=-1).amin(dim=-1) for k in range(neg.shape[1])]).mean(dim=0)
                scores.append(mcm - min_cm)
            predicted.append(cos.argmax(dim=-1))
        return torch.cat(scores), torch.cat(predicted)

    def state(self) -> dict[str, Tensor]:
        state = {"positive_ctx": self.positive.ctx, "negative_ctx": self.negative.ctx}
        if self.conditional is not None:
            state.update({f"meta_net.{k}": v for k, v in self.conditional.meta_net.state_dict().items()})
        return state

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        self.positive.ctx.data.copy_(tensors["positive_ctx"])
        self.negative.ctx.data.copy_(tensors["negative_ctx"])
        if self.conditional is not None:
            self.conditional.meta_net.load_state_dict(
                {k.removeprefix("meta_net."): v for k, v in tensors.items() if k.startswith("meta_net.")})


def _per_image_cosines(image: Tensor, text: Tensor) -> Tensor:
    """cos(image_b, text_bc): image [B, E], per-image prompts text [B, C, E] -> [B, C]."""
    return torch.einsum("be,bce->bc", F.normalize(image, dim=-1), F.normalize(text, dim=-1))
