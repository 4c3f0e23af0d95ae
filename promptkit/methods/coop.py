"""CoOp (Zhou et al., IJCV 2022): a learned shared context for the class prompts, scored with MCM."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from promptkit import ops
from promptkit.clip import PromptLearner
from promptkit.distributed import encode_prompts
from promptkit.methods.base import Method, cosine_lr, train_loop
from promptkit.methods.mcm import score_and_classify


@dataclass
class CoOpConfig:
    n_ctx: int = 16
    ctx_init: str | None = None  # None: random N(0, 0.02^2); else init words such as "a photo of a"
    class_specific: bool = False
    epochs: int = 50
    batch_size: int = 32
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1  # at a constant 1e-5, as CoOp's configs
    temperature: float = 1.0  # MCM temperature of the test score
    seed: int = 1


def clip_logit_scale(clip) -> float:
    """CLIP's learned logit scale exp(t) (about 100 for OpenAI weights), the scale of the training logits."""
    return float(clip.model.logit_scale.exp())


def fit_positive_prompts(prompts: PromptLearner, clip, features: Tensor, labels: Tensor, epochs: int,
                         batch_size: int, lr: float, momentum: float, weight_decay: float, warmup_epochs: int,
                         seed: int, backend: str, progress: bool, desc: str) -> list[float]:
    """CoOp's stage: cross-entropy of logit_scale * cos(image, prompts) towards the labels, SGD + cosine."""
    optimizer = torch.optim.SGD(prompts.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = cosine_lr(optimizer, epochs, warmup_epochs)
    scale = clip_logit_scale(clip)

    def loss_fn(index: Tensor) -> Tensor:
        text = encode_prompts(prompts)[0]
        logits = ops.cosine_logits(features[index], text, scale, backend=backend)
        return F.cross_entropy(logits, labels[index])

    return train_loop(loss_fn, list(prompts.parameters()), optimizer, len(features), epochs, batch_size, seed,
                      desc, progress, scheduler)


class CoOp(Method):
    """Context optimisation: [SOS] + learned context + class name; MCM score on the learned prompts."""

    name = "coop"
    Config = CoOpConfig

    def __init__(self, clip, class_names, config=None, backend="auto"):
        super().__init__(clip, class_names, config, backend)
        torch.manual_seed(self.config.seed)
        self.prompts = PromptLearner(clip, self.class_names, n_ctx=self.config.n_ctx,
                                     class_specific=self.config.class_specific, ctx_init=self.config.ctx_init)

    def fit(self, features: Tensor, labels: Tensor, progress: bool = True) -> "CoOp":
        c = self.config
        self.info["loss"] = fit_positive_prompts(
            self.prompts, self.clip, features, labels, c.epochs, c.batch_size, c.lr, c.momentum, c.weight_decay,
            c.warmup_epochs, c.seed, self.backend, progress, "coop")
        return self

    @torch.no_grad()
    def text_features(self) -> Tensor:
        return encode_prompts(self.prompts)[0]

    def score(self, features: Tensor) -> tuple[Tensor, Tensor]:
        return score_and_classify(features, self.text_features(), self.config.temperature, self.backend)

    def state(self) -> dict[str, Tensor]:
        return {"ctx": self.prompts.ctx}

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        self.prompts.ctx.data.copy_(tensors["ctx"])
