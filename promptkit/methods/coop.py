"""CoOp (Zhou et al., IJCV 2022): a learned shared context for the class prompts, scored with MCM."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from promptkit.clip import PromptLearner
from promptkit.methods.base import Method, TextFeatures
from promptkit.methods.shared import PromptFit, Stage, clip_logit_scale, encode, fit_positive_prompts, \
    mcm_score_and_classify


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
        c = self.config
        self.prompts = PromptLearner(clip, self.class_names, n_ctx=c.n_ctx, class_specific=c.class_specific,
                                     ctx_init=c.ctx_init)

    def _fit(self, features: Tensor, labels: Tensor, progress: bool) -> None:
        c = self.config
        stage = Stage(c.epochs, c.batch_size, c.lr, c.momentum, c.weight_decay, warmup_epochs=c.warmup_epochs)
        run = PromptFit(stage, c.seed, self.backend, "coop", progress)
        self.info["loss"] = fit_positive_prompts(self.prompts, features, labels, clip_logit_scale(self.clip), run)

    def _encode_text(self, local: bool) -> TextFeatures:
        return TextFeatures(encode(self.prompts, local)[0])

    def _score(self, features: Tensor, text: TextFeatures) -> tuple[Tensor, Tensor]:
        return mcm_score_and_classify(features, text.id, self.config.temperature, self.backend)

    def state(self) -> dict[str, Tensor]:
        return {"ctx": self.prompts.ctx}
