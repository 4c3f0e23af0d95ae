"""What several methods share: a training stage's optimiser settings and schedules, the epoch loop, the
cross-entropy prompt stage (CoOp's, also LSN's and NegPrompt's positive stage) and the MCM and grouped NegLabel
scores (MCM, CoOp, LSN; NegLabel, LAPT)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from promptkit import distributed, ops
from promptkit.distributed import encode_prompts
from promptkit.errors import UserError

# "cosine": decay to 0 over the stage, stepped once per epoch (or per step with per_step=True), after an optional
# constant warm-up (CoOp). "restarts-50": torch's CosineAnnealingLR(T_max=50) stepped after every batch and
# again after every epoch, so the rate falls and rises with a period of 100 steps (NegPrompt's released code).
LR_SCHEDULES = ("cosine", "restarts-50")


class TrainingDiverged(UserError, FloatingPointError):
    """The loss became NaN or infinite: the settings (usually the learning rate) do not suit this data."""


@dataclass(frozen=True)
class Stage:
    """How one training stage runs: SGD settings, learning-rate schedule, epochs and batch size."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 0.0
    nesterov: bool = False
    warmup_epochs: int = 0  # at a constant 1e-5 (CoOp's configs)
    lr_schedule: str = "cosine"
    per_step: bool = False  # "cosine" decays over steps instead of epochs (LAPT)

    def __post_init__(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")

    def sgd(self, parameters: list[Tensor]) -> torch.optim.SGD:
        return torch.optim.SGD(parameters, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                               nesterov=self.nesterov)

    def scheduler(self, optimizer: torch.optim.Optimizer, num_samples: int) -> torch.optim.lr_scheduler.LRScheduler:
        if self.lr_schedule == "restarts-50":
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=50)
        steps = self.epochs * math.ceil(num_samples / self.batch_size) if self.per_step else self.epochs
        return cosine_lr(optimizer, steps, self.warmup_epochs)

    @property
    def step_scheduler(self) -> str:
        """When ``train_loop`` steps the scheduler: "epoch", "batch" or "batch+epoch"."""
        if self.lr_schedule == "restarts-50":
            return "batch+epoch"
        return "batch" if self.per_step else "epoch"


def cosine_lr(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
              warmup_lr: float = 1e-5) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay over ``total_steps`` after ``warmup_steps`` at a constant ``warmup_lr`` (CoOp's schedule)."""
    base = optimizer.param_groups[0]["lr"]

    def factor(step: int) -> float:
        if step < warmup_steps:
            return warmup_lr / base
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def batches(n: int, batch_size: int, generator: torch.Generator) -> Iterable[Tensor]:
    """Shuffled index batches of one epoch (the last batch may be smaller)."""
    order = torch.randperm(n, generator=generator)
    return order.split(batch_size)


def train_loop(
    loss_fn: Callable[[Tensor], Tensor],
    parameters: list[Tensor],
    optimizer: torch.optim.Optimizer,
    num_samples: int,
    epochs: int,
    batch_size: int,
    seed: int,
    desc: str,
    progress: bool = True,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    step_scheduler: str = "epoch",
) -> list[float]:
    """Run ``epochs`` over shuffled batches, calling ``loss_fn(batch_indices)``; returns each epoch's mean loss.

    ``loss_fn`` must return the mean over its batch (plus terms that do not depend on the images). Under torchrun
    every rank draws the same global batch, calls ``loss_fn`` on its own part of it, and the gradients are summed
    over ranks with each part weighted by its share, so a step equals the single-process step on the whole batch.
    ``step_scheduler`` is "epoch", "batch" or "batch+epoch" (both).
    """
    generator = torch.Generator().manual_seed(seed)
    history = []
    distributed.broadcast_(parameters)  # replicas start from rank 0's prompts
    bar = tqdm(range(epochs), desc=desc, disable=not progress or not distributed.is_main(), leave=False)
    for _ in bar:
        total, count = 0.0, 0
        for index in batches(num_samples, batch_size, generator):
            local, share = distributed.local_batch(index)
            loss = loss_fn(local) * share  # share is 1 in a single process
            global_loss = distributed.sum_over_ranks(loss.detach())  # the same value on every rank
            if not torch.isfinite(global_loss):
                raise TrainingDiverged(f"{desc}: the loss became {global_loss.item()}; lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            distributed.sum_gradients(parameters)
            optimizer.step()
            if scheduler is not None and "batch" in step_scheduler:
                scheduler.step()
            total, count = total + global_loss.item() * len(index), count + len(index)
        if scheduler is not None and "epoch" in step_scheduler:
            scheduler.step()
        history.append(total / max(1, count))
        bar.set_postfix(loss=f"{history[-1]:.4f}")
    return history


def clip_logit_scale(clip) -> float:
    """CLIP's learned logit scale exp(t) (about 100 for OpenAI weights), the scale of the training logits."""
    return float(clip.model.logit_scale.exp())


@dataclass(frozen=True)
class PromptFit:
    """How one prompt stage runs: its ``Stage``, the seed of its batch order, the op backend and the progress bar
    (``desc`` names the stage in it and in a divergence error)."""

    stage: Stage
    seed: int
    backend: str
    desc: str
    progress: bool = True


def fit_by_cross_entropy(parameters: list[Tensor], logits: Callable[[Tensor], Tensor], labels: Tensor,
                         run: PromptFit, double_softmax: bool = False) -> list[float]:
    """Train ``parameters`` on the cross-entropy of ``logits(batch_indices)`` [b, C] towards ``labels`` [N].

    ``double_softmax``: the cross-entropy is taken of the softmax probabilities instead of the logits, as LSN's
    released code does (``F.cross_entropy(F.softmax(100 * cos))``). Returns each epoch's mean loss.
    """
    optimizer = run.stage.sgd(parameters)
    scheduler = run.stage.scheduler(optimizer, len(labels))

    def loss_fn(index: Tensor) -> Tensor:
        z = logits(index)
        return F.cross_entropy(torch.softmax(z, dim=-1) if double_softmax else z, labels[index])

    return train_loop(loss_fn, parameters, optimizer, len(labels), run.stage.epochs, run.stage.batch_size,
                      run.seed, run.desc, run.progress, scheduler, run.stage.step_scheduler)


def fit_positive_prompts(prompts, features: Tensor, labels: Tensor, logit_scale: float, run: PromptFit,
                         double_softmax: bool = False) -> list[float]:
    """CoOp's stage: cross-entropy of logit_scale * cos(image [N, E], prompts [C, E]) towards labels [N]."""
    def logits(index: Tensor) -> Tensor:
        return ops.cosine_logits(features[index], encode_prompts(prompts)[0], logit_scale, backend=run.backend)

    return fit_by_cross_entropy(list(prompts.parameters()), logits, labels, run, double_softmax)


def encode(prompts, local: bool, **selection) -> Tensor:
    """Raw text features [K, C, E] of a prompt learner: in this process alone (``local``) or with the text-encoder
    work split over torchrun ranks (``encode_prompts``); ``selection``: ``sets=`` / ``classes=``."""
    return prompts(**selection) if local else encode_prompts(prompts, **selection)


def mcm_score_and_classify(features: Tensor, text: Tensor, temperature: float, backend: str
                           ) -> tuple[Tensor, Tensor]:
    """MCM score [N] and the nearest class [N] of image features [N, E] against class prompts [C, E]."""
    score = ops.mcm_score(features, text, temperature, backend=backend)
    return score, ops.cosine_logits(features, text, backend=backend).argmax(dim=-1)


@dataclass(frozen=True)
class GroupedScore:
    """The settings of NegLabel's grouped score: softmax temperature, number of groups of negatives (capped at
    M), the seed of the grouping permutation and the grouping order (``ops.neglabel_score``)."""

    temperature: float
    groups: int
    seed: int
    order: str


def grouped_neglabel_score(features: Tensor, id_text: Tensor, neg_text: Tensor, settings: GroupedScore,
                           backend: str) -> tuple[Tensor, Tensor]:
    """NegLabel score [N] and the nearest ID class [N] of image features [N, E]; id_text [C, E], neg_text [M, E]."""
    groups = max(1, min(settings.groups, neg_text.shape[0]))
    score = ops.neglabel_score(features, id_text, neg_text, settings.temperature, groups, settings.seed,
                               backend=backend, group_order=settings.order)
    return score, ops.cosine_logits(features, id_text, backend=backend).argmax(dim=-1)


class NegativeLabelScore:
    """The score of the methods with negative labels (NegLabel, LAPT): NegLabel's grouped score of their ID [C, E]
    and negative-label [M, E] text features, with the config's temperature, groups, group_seed and group_order."""

    text_kinds = ("id", "label_negatives")

    def _score(self, features: Tensor, text) -> tuple[Tensor, Tensor]:
        c = self.config
        settings = GroupedScore(c.temperature, c.groups, c.group_seed, c.group_order)
        return grouped_neglabel_score(features, text.id, text.label_negatives, settings, self.backend)
