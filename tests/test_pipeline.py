"""The run pipeline's data split: few-shot training images and the held-out images of the threshold."""

import torch

from promptkit import pipeline
from promptkit.data.fewshot import few_shot_indices


def test_split_training_is_seeded_disjoint_and_capped(monkeypatch):
    labels = torch.arange(5).repeat_interleave(40)
    labels[::17] = -1  # unlabelled images are never picked
    chosen, rest = pipeline.split_training(labels, shots=3, seed=7)
    assert torch.equal(chosen, few_shot_indices(labels, 3, 7))
    assert set(chosen.tolist()).isdisjoint(rest.tolist())
    assert (labels[rest] >= 0).all() and len(chosen) + len(rest) == int((labels >= 0).sum())
    again = pipeline.split_training(labels, shots=3, seed=7)
    assert torch.equal(again[0], chosen) and torch.equal(again[1], rest)

    monkeypatch.setattr(pipeline, "HELDOUT_LIMIT", 10)
    chosen_capped, capped = pipeline.split_training(labels, shots=3, seed=7)
    assert torch.equal(chosen_capped, chosen) and len(capped) == 10
    assert set(capped.tolist()) <= set(rest.tolist()) and torch.equal(capped, capped.sort().values)


def test_split_training_with_all_shots():
    labels = torch.tensor([0, 1, -1, 1])
    chosen, rest = pipeline.split_training(labels, shots=0, seed=1)
    assert chosen.tolist() == [0, 1, 3] and rest.tolist() == []
