"""Seeded few-shot sampling: the same (labels, shots, seed) always picks the same images."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor


def few_shot_indices(labels: Tensor, shots: int, seed: int) -> Tensor:
    """Pick ``shots`` images per class at random, reproducibly.

    Args:
        labels: ``[N]`` int class labels; entries < 0 (unknown) are never picked.
        shots: images per class, >= 1. A class with fewer images gives all of them (with a warning).
        seed: the sampling seed. Each class draws from its own CPU generator seeded from (seed, class), so
            the images picked for one class do not depend on the other classes.

    Returns:
        ``[M]`` int64 indices into ``labels``, sorted ascending (M = sum over classes of min(shots, count)).
    """
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"few_shot_indices: labels must be a 1-D integer tensor, "
                         f"got {labels.dtype} {list(labels.shape)}")
    if shots < 1:
        raise ValueError(f"few_shot_indices: shots must be >= 1, got {shots}")
    labels = labels.cpu().long()
    picked = []
    short = []
    for c in torch.unique(labels[labels >= 0]).tolist():
        members = torch.nonzero(labels == c).flatten()
        if len(members) < shots:
            short.append((c, len(members)))
        gen = torch.Generator().manual_seed((seed * 1_000_003 + c) % (2**63))
        picked.append(members[torch.randperm(len(members), generator=gen)[:shots]])
    if short:
        c, n = short[0]
        warnings.warn(f"{len(short)} classes have fewer than {shots} images and are used whole "
                      f"(e.g. class {c}: {n})", stacklevel=2)
    if not picked:
        return torch.empty(0, dtype=torch.int64)
    return torch.sort(torch.cat(picked)).values
