"""NegPrompt (Li et al., CVPR 2024): transferable negative prompts shared across classes.

Stage 1 learns a shared positive context (CoOp, initialised from "a photo of a"). Stage 2 freezes it (its text
features are computed once) and learns p shared negative contexts, started from the positive one plus small
noise, with L_NIS + beta L_NPD + gamma L_NND (Eq. 4-7). Score (Eq. 3): the largest positive-prompt probability in
one softmax over all C positive and C*p negative prompts.

Open-vocabulary mode (``train_classes="10%"``): both stages learn on the first 10 % of the ID classes; because
the contexts are shared, scoring forms prompts for every ID class name with them.

``compat="official-code"`` uses the released code's stage-2 schedule: SGD lr 0.1 for 100 epochs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from promptkit import ops
from promptkit.clip import PromptLearner
from promptkit.distributed import encode_prompts
from promptkit.methods.base import Method, cosine_lr, train_loop
from promptkit.methods.coop import fit_positive_prompts

COMPAT = ("paper", "official-code")


@dataclass
class NegPromptConfig:
    compat: str = "paper"
    ctx_init: str = "a photo of a"
    train_classes: str = "100%"  # "10%": open-vocabulary mode, learn on the first 10 % of the classes
    # stage 1: positive prompt
    pos_epochs: int = 100
    pos_batch_size: int = 32
    pos_lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # stage 2: negative prompts
    n_neg: int = 2  # p negative prompts per class
    neg_epochs: int = 10
    neg_batch_size: int = 32
    neg_lr: float = 0.002
    init_noise: float = 1e-5  # negatives start at the positive context + U(-noise, noise)
    beta: float = 0.1
    gamma: float = 0.05
    train_temperature: float = 0.01  # CLIP's scale 100 on the cosine
    temperature: float = 1.0  # test score
    cache_frozen_text: bool = True  # encode the frozen positives once in stage 2 (False: every step)
    seed: int = 1

    def __post_init__(self) -> None:
        if self.compat not in COMPAT:
            raise ValueError(f"negprompt: compat must be one of {COMPAT}, got {self.compat!r}")
        if self.compat == "official-code":
            self.neg_lr, self.neg_epochs = 0.1, 100
        if self.n_neg < 1:
            raise ValueError(f"negprompt: n_neg must be >= 1, got {self.n_neg}")
        train_class_count(self.train_classes, 1)  # validates the format


def train_class_count(spec: str, num_classes: int) -> int:
    """Number of leading classes to train on: "100%", "10%" (floor, at least 1) or a count such as "50"."""
    text = str(spec).strip()
    try:
        if text.endswith("%"):
            share = float(text[:-1]) / 100
            if not 0 < share <= 1:
                raise ValueError
            return max(1, int(num_classes * share))
        count = int(text)
    except ValueError:
        raise ValueError(f"negprompt: train_classes must be a share like '10%' or a count, got {spec!r}") from None
    if not 1 <= count:
        raise ValueError(f"negprompt: train_classes must be >= 1, got {spec!r}")
    return min(count, num_classes)


class NegPrompt(Method):
    """Shared positive context + p shared negative contexts, one joint softmax at test."""

    name = "negprompt"
    Config = NegPromptConfig

    def __init__(self, clip, class_names, config=None, backend="auto"):
        super().__init__(clip, class_names, config, backend)
        c = self.config
        torch.manual_seed(c.seed)
        self.positive = PromptLearner(clip, self.class_names, ctx_init=c.ctx_init)
        self.negative = PromptLearner(clip, self.class_names, n_ctx=self.positive.n_ctx, n_sets=c.n_neg)

    def fit(self, features: Tensor, labels: Tensor, progress: bool = True) -> "NegPrompt":
        c = self.config
        known = train_class_count(c.train_classes, len(self.class_names))
        if known < len(self.class_names):
            keep = labels < known
            features, labels = features[keep], labels[keep]
            for prompts in (self.positive, self.negative):
                prompts.set_class_names(self.class_names[:known])
        self.info["train_classes"] = known
        try:
            self.info["positive_loss"] = fit_positive_prompts(
                self.positive, self.clip, features, labels, c.pos_epochs, c.pos_batch_size, c.pos_lr, c.momentum,
                c.weight_decay, 0, c.seed, self.backend, progress, "negprompt positive")
            self.info["negative_loss"] = self._fit_negatives(features, progress)
        finally:
            for prompts in (self.positive, self.negative):
                prompts.set_class_names(self.class_names)
        return self

    def _fit_negatives(self, features: Tensor, progress: bool) -> list[float]:
        c = self.config
        with torch.no_grad():
            start = self.positive.ctx.expand_as(self.negative.ctx)
            noise = torch.empty_like(start).uniform_(-c.init_noise, c.init_noise)
            self.negative.ctx.copy_(start + noise)
            positive = self._frozen_positive()  # frozen in stage 2: encoded once
        optimizer = torch.optim.SGD([self.negative.ctx], lr=c.neg_lr, momentum=c.momentum)
        scheduler = cosine_lr(optimizer, c.neg_epochs)

        def loss_fn(index: Tensor) -> Tensor:
            negative = encode_prompts(self.negative).transpose(0, 1)  # [C, p, E]
            frozen = positive if c.cache_frozen_text else self._frozen_positive()
            return ops.negprompt_loss(features[index], frozen, negative, c.beta, c.gamma, c.train_temperature,
                                      backend=self.backend)

        return train_loop(loss_fn, [self.negative.ctx], optimizer, len(features), c.neg_epochs, c.neg_batch_size,
                          c.seed + 1, "negprompt negatives", progress, scheduler)

    @torch.no_grad()
    def _frozen_positive(self) -> Tensor:
        return encode_prompts(self.positive)[0]

    @torch.no_grad()
    def text_features(self) -> tuple[Tensor, Tensor]:
        """Positive [C, E] and negative [C, p, E] raw text features for every ID class."""
        return encode_prompts(self.positive)[0], encode_prompts(self.negative).transpose(0, 1)

    @torch.no_grad()
    def score(self, features: Tensor) -> tuple[Tensor, Tensor]:
        pos, neg = (t.to(features) for t in self.text_features())
        score = ops.negprompt_score(features, pos, neg, self.config.temperature, backend=self.backend)
        return score, ops.cosine_logits(features, pos, backend=self.backend).argmax(dim=-1)

    def state(self) -> dict[str, Tensor]:
        return {"positive_ctx": self.positive.ctx, "negative_ctx": self.negative.ctx}

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        self.positive.ctx.data.copy_(tensors["positive_ctx"])
        self.negative.ctx.data.copy_(tensors["negative_ctx"])
