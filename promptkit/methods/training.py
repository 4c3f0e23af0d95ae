"""What the prompt-learning methods share to train: a stage's optimiser settings, its schedules, the epoch loop and
CoOp's positive-prompt stage (used by CoOp, LSN and NegPrompt)."""

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


def fit_positive_prompts(prompts, clip, features: Tensor, labels: Tensor, stage: Stage, seed: int, backend: str,
                         progress: bool, desc: str, double_softmax: bool = False) -> list[float]:
    """CoOp's stage: cross-entropy of logit_scale * cos(image [N, E], prompts [C, E]) towards labels [N].

    ``double_softmax``: the cross-entropy is taken of the softmax probabilities instead of the logits, as LSN's
    released code does (``F.cross_entropy(F.softmax(100 * cos))``).
    """
    parameters = list(prompts.parameters())
    optimizer = stage.sgd(parameters)
    scheduler = stage.scheduler(optimizer, len(features))
    scale = clip_logit_scale(clip)

    def loss_fn(index: Tensor) -> Tensor:
        text = encode_prompts(prompts)[0]
        logits = ops.cosine_logits(features[index], text, scale, backend=backend)
        if double_softmax:
            logits = torch.softmax(logits, dim=-1)
        return F.cross_entropy(logits, labels[index])

    return train_loop(loss_fn, parameters, optimizer, len(features), stage.epochs, stage.batch_size, seed, desc,
                      progress, scheduler, stage.step_scheduler)
