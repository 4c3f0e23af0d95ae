"""CoOp (Zhou et al., IJCV 2022): a learned shared context for the class prompts, scored with MCM."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from promptkit.clip import PromptLearner
from promptkit.distributed import encode_prompts
from promptkit.methods.base import Method
from promptkit.methods.mcm import score_and_classify
from promptkit.methods.training import Stage, fit_positive_prompts


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
        stage = Stage(c.epochs, c.batch_size, c.lr, c.momentum, c.weight_decay, warmup_epochs=c.warmup_epochs)
        self.info["loss"] = fit_positive_prompts(self.prompts, self.clip, features, labels, stage, c.seed,
                                                 self.backend, progress, "coop")
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

    @torch.no_grad()
    def head_text(self) -> Tensor:
        """text_features() on this rank alone: ``save`` runs on rank 0 only, encode_prompts would wait for the rest."""
        return self.prompts()[0]
