"""What every OOD method shares: the interface, saving/loading learned prompts, and the training loop."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

import promptkit
from promptkit import distributed
from promptkit.data.atomic import atomic_write
from promptkit.errors import UserError

PROMPTS_FILE = "prompts.safetensors"
META_FILE = "prompts.json"


class PromptsError(UserError, ValueError):
    """Saved prompts that cannot be used here (missing, corrupt, or for another model or class list)."""


class Method:
    """An OOD detector on a frozen CLIP: ``fit`` on image features, ``score`` new ones (higher = more ID).

    Subclasses set ``name`` and ``Config`` (a dataclass whose defaults are the paper's), implement ``fit`` when
    they learn something, ``_text_features`` and ``score``, and list their learned tensors in ``state()``.
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    trainable: ClassVar[bool] = True
    # True for methods that learn from images collected for their labels (LAPT), not from --train images.
    collects_training_images: ClassVar[bool] = False

    def __init__(self, clip, class_names: list[str], config: Any = None, backend: str = "auto") -> None:
        if not class_names:
            raise ValueError(f"{self.name}: the class list is empty; give at least one in-distribution class")
        self.clip = clip
        self.class_names = list(class_names)
        self.config = config if config is not None else self.Config()
        self.backend = backend
        self.threshold: float | None = None
        self.info: dict[str, Any] = {}

    # -- learning and scoring -------------------------------------------------------------------------

    def mine(self, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> object:
        """Prepare what the method derives from the model before training (NegLabel/LAPT: negative labels)."""
        return None

    def fit(self, features: Tensor, labels: Tensor, progress: bool = True) -> "Method":
        """Learn from image features [N, E] with labels [N] (int64, class indices)."""
        return self

    def score(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """OOD score [N] (higher = more in-distribution) and predicted class [N] for image features [N, E]."""
        raise NotImplementedError

    def state(self) -> dict[str, Tensor]:
        """The learned tensors that ``save`` stores (empty for zero-shot methods)."""
        return {}

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        """Restore what ``state`` returned."""

    # -- persistence ----------------------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "config": dataclasses.asdict(self.config),
            "model": {"name": self.clip.name, "pretrained": self.clip.pretrained,
                      "fingerprint": self.clip.fingerprint},
            "class_names": self.class_names,
            "threshold": self.threshold,
            "info": self.info,
            "promptkit_version": promptkit.__version__,
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``prompts.safetensors`` and the ``prompts.json`` sidecar into ``directory`` (atomically)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state().items()}
        with atomic_write(directory / PROMPTS_FILE) as tmp:
            save_file(tensors, str(tmp))
        with atomic_write(directory / META_FILE) as tmp:
            tmp.write_text(json.dumps(self.metadata(), indent=2))
        return directory


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """The JSON sidecar of saved prompts, with a clear error when it is missing or unreadable."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise PromptsError(f"{path}: no saved prompts here (expected {META_FILE} from `promptkit train`)")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise PromptsError(f"{path}: unreadable prompts metadata ({error})") from error


def load_method(directory: str | os.PathLike, clip, registry: dict[str, type], backend: str = "auto") -> Method:
    """Rebuild a saved method on ``clip``; refuses prompts learned on another model."""
    meta = read_metadata(directory)
    if meta.get("method") not in registry:
        raise PromptsError(f"{directory}: unknown method {meta.get('method')!r} in {META_FILE}")
    model = meta["model"]
    if model["fingerprint"] != clip.fingerprint:
        raise PromptsError(
            f"{directory}: these prompts were learned on model {model['name']} ({model['pretrained']}), not on "
            f"{clip.name} ({clip.pretrained}); pass --model {model['name']} --pretrained {model['pretrained']}")
    cls = registry[meta["method"]]
    known = {f.name for f in dataclasses.fields(cls.Config)}
    config = cls.Config(**{k: v for k, v in meta["config"].items() if k in known})
    method = cls(clip, meta["class_names"], config, backend=backend)
    tensor_path = Path(directory) / PROMPTS_FILE
    try:
        tensors = load_file(str(tensor_path))
    except Exception as error:  # safetensors raises several types for missing, truncated or corrupt files
        raise PromptsError(f"{tensor_path}: cannot read the saved prompts ({error})") from error
    expected = set(method.state())
    if set(tensors) != expected:
        raise PromptsError(f"{tensor_path}: holds {sorted(tensors)} but {cls.name} needs {sorted(expected)}")
    method.load_state(tensors)
    method.threshold = meta.get("threshold")
    method.info = meta.get("info", {})
    return method


# -- training loop -----------------------------------------------------------------------------------

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
    step_scheduler_per_batch: bool = False,
) -> list[float]:
    """Run ``epochs`` over shuffled batches, calling ``loss_fn(batch_indices)``; returns each epoch's mean loss.

    ``loss_fn`` must return the mean over its batch (plus terms that do not depend on the images). Under torchrun
    every rank draws the same global batch, calls ``loss_fn`` on its own part of it, and the gradients are summed
    over ranks with each part weighted by its share, so a step equals the single-process step on the whole batch.
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
                raise FloatingPointError(f"{desc}: the loss became {global_loss.item()}; lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            distributed.sum_gradients(parameters)
            optimizer.step()
            if scheduler is not None and step_scheduler_per_batch:
                scheduler.step()
            total, count = total + global_loss.item() * len(index), count + len(index)
        if scheduler is not None and not step_scheduler_per_batch:
            scheduler.step()
        history.append(total / max(1, count))
        bar.set_postfix(loss=f"{history[-1]:.4f}")
    return history
