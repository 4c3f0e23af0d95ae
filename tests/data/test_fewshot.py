from __future__ import annotations

import pytest
import torch

from promptkit.data import few_shot_indices


def _labels() -> torch.Tensor:
    # class 0: 10 images, class 1: 7, class 2: 2, plus 3 unlabelled, interleaved
    labels = torch.tensor([0] * 10 + [1] * 7 + [2] * 2 + [-1] * 3)
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(123))]


def test_counts_and_membership() -> None:
    labels = _labels()
    with pytest.warns(UserWarning, match="1 classes have fewer than 4 images .*class 2: 2"):
        idx = few_shot_indices(labels, shots=4, seed=0)
    assert idx.dtype == torch.int64
    assert torch.equal(idx, torch.sort(idx).values)
    assert len(set(idx.tolist())) == len(idx)
    picked = labels[idx]
    assert [(picked == c).sum().item() for c in (0, 1, 2)] == [4, 4, 2]
    assert (picked >= 0).all()


def test_same_seed_same_picks_other_seed_other_picks() -> None:
    labels = _labels()
    a = few_shot_indices(labels, shots=2, seed=7)
    assert torch.equal(a, few_shot_indices(labels.clone(), shots=2, seed=7))
    assert any(not torch.equal(a, few_shot_indices(labels, shots=2, seed=s)) for s in range(8, 12))


def test_a_class_pick_does_not_depend_on_other_classes() -> None:
    labels = torch.tensor([0] * 20 + [1] * 20)
    both = few_shot_indices(labels, shots=5, seed=3)
    only_one = labels.clone()
    only_one[:20] = -1  # drop class 0
    picks_1 = few_shot_indices(only_one, shots=5, seed=3)
    assert torch.equal(both[labels[both] == 1], picks_1)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="shots must be >= 1"):
        few_shot_indices(torch.tensor([0, 1]), shots=0, seed=0)
    with pytest.raises(ValueError, match="1-D integer tensor"):
        few_shot_indices(torch.zeros(2, 2, dtype=torch.long), shots=1, seed=0)
    with pytest.raises(ValueError, match="1-D integer tensor"):
        few_shot_indices(torch.tensor([0.0, 1.0]), shots=1, seed=0)
    assert few_shot_indices(torch.tensor([-1, -1]), shots=1, seed=0).numel() == 0
