"""LAPT: mixing formulas against hand-computed values, and train/score/save/reload on the tiny model."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from promptkit import ops
from promptkit.clip import load_clip
from promptkit.data.sources import EmbeddedSource
from promptkit.methods import load_method
from promptkit.methods.lapt import LAPT, LAPTConfig, cross_distribution_partners, cross_distribution_targets
from promptkit.ops import reference
from promptkit.pipeline import RunOptions, embedded_datasets, extract, train_and_evaluate

from ..cli_helpers import run_cli


def test_cross_distribution_targets_hand_computed():
    # C = 1 ID label, M = 2 negatives; sample 0 is ID (label 0), sample 1 negative (label 2), paired together.
    targets = torch.tensor([[1.0, 0, 0], [0, 0, 1.0]])
    partner = torch.tensor([1, 0])
    # s = min(0.3 * 0.6, 1) = 0.18; y_ood = [0, .5, .5]
    # row 0: 0.18 y_ood + 0.82 (0.6 [1,0,0] + 0.4 [0,0,1]) = [0.492, 0.09, 0.418]
    # row 1: 0.18 y_ood + 0.82 (0.6 [0,0,1] + 0.4 [1,0,0]) = [0.328, 0.09, 0.582]
    got = cross_distribution_targets(targets, partner, lam=0.6, beta=0.3, num_id=1)
    torch.testing.assert_close(got, torch.tensor([[0.492, 0.09, 0.418], [0.328, 0.09, 0.582]]))
    # the "uniform" OOD target spreads s over all 3 labels: row 0 = 0.06 + 0.82 [0.6, 0, 0.4]
    uniform = cross_distribution_targets(targets, partner, lam=0.6, beta=0.3, num_id=1, ood_target="uniform")
    torch.testing.assert_close(uniform[0], torch.tensor([0.552, 0.06, 0.388]))
    # beta * lam above 1 is capped: the target is y_ood alone
    capped = cross_distribution_targets(targets, partner, lam=0.5, beta=3.0, num_id=1)
    torch.testing.assert_close(capped, torch.tensor([[0, 0.5, 0.5], [0, 0.5, 0.5]]))


def test_cross_distribution_partners_pair_id_with_negatives():
    labels = torch.tensor([0, 5, 1, 7, 6, 2])  # num_id = 3: ID rows 0, 2, 5; negative rows 1, 3, 4
    partner = cross_distribution_partners(labels, 3, torch.Generator().manual_seed(0))
    is_id = labels < 3
    assert torch.equal(is_id[partner], ~is_id)
    assert cross_distribution_partners(torch.tensor([0, 1, 2]), 3, torch.Generator()) is None


def test_cross_modal_mix_hand_computed():
    # normalise(0.75 (1, 0) + 0.25 (0, 1)) = (3, 1) / sqrt(10)
    image, text = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    expected = torch.tensor([[3.0, 1.0]]) / math.sqrt(10)
    torch.testing.assert_close(ops.mix_features(image, text, 0.75), expected)
    torch.testing.assert_close(ops.mix_features(image, text, 0.75, backend="torch"), expected)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("lapt-cache")


@pytest.fixture(scope="module")
def vocabulary(tmp_path_factory):
    words = ["gravel", "grass", "brick wall", "digit seven", "digit two", "lamp", "pizza", "bicycle", "cloud",
             "guitar", "river", "t-shirt", "a\tred", "a\tblurry", "a\tsmall"]
    path = tmp_path_factory.mktemp("vocab") / "words.txt"
    path.write_text("\n".join(words) + "\n")
    return str(path)


QUICK = {"epochs": 1, "train_negatives": 6, "test_negatives": 10, "images_per_label": 4, "groups": 3}


def test_train_score_save_reload(cache, vocabulary, tmp_path, monkeypatch):
    monkeypatch.setenv("PROMPTKIT_CACHE", str(cache))
    clip = load_clip()
    options = RunOptions(progress=False)
    run = train_and_evaluate("lapt", clip, embedded_datasets(), shots=16, seed=2,
                             overrides={**QUICK, "vocabulary": vocabulary}, options=options)
    method = run.method
    train, test = method.negative_labels()
    assert len(train) == 6 and len(test) == 10 and "t-shirt" not in test.words
    assert set(train.words) <= set(test.words)  # the same ranking, a shorter list
    assert method.label_images().labels[:6] == method.class_names
    collected = method.info["train"]
    assert collected["labels_with_images"]["id"] == 6 and collected["collected_images"] <= 4 * 12
    assert method.info["cross_distribution_batches"] > 0
    assert run.metrics["id_accuracy"] > 1 / 6
    untrained = LAPT(clip, method.class_names, LAPTConfig(seed=2)).state()
    for name, tensor in method.state().items():
        assert tensor.shape == (1, 1, 4, 64) and not torch.equal(tensor, untrained[name]), name

    # the score is the grouped NegLabel score on the learned ID prompts and the 10 test negatives
    features = extract(clip, EmbeddedSource("test"), options).features
    scores, predicted = method.score(features)
    text = method.text_features()
    id_text, neg_text = text.id, text.label_negatives
    assert neg_text.shape == (10, 64)
    torch.testing.assert_close(scores, reference.neglabel_score(features, id_text, neg_text, 0.01, 3, 0))

    method.save(tmp_path / "prompts")

    def no_mining(*args, **kwargs):
        raise AssertionError("a reload mined again")

    monkeypatch.setattr("promptkit.methods.lapt.mine_negative_labels", no_mining)
    reloaded = load_method(tmp_path / "prompts", clip)
    torch.testing.assert_close(reloaded.score(features)[0], scores)

    out = tmp_path / "scores.csv"
    run_cli("score", "--prompts", str(tmp_path / "prompts"), "--images", "embedded:test", "--output", str(out),
            cwd=tmp_path, cache=cache)
    with open(out) as handle:
        got = torch.tensor([float(r["score"]) for r in csv.DictReader(handle)], dtype=scores.dtype)
    torch.testing.assert_close(got, scores, rtol=1e-5, atol=1e-6)


def test_mixing_can_be_switched_off_and_m_is_capped(cache, vocabulary, monkeypatch):
    monkeypatch.setenv("PROMPTKIT_CACHE", str(cache))
    clip = load_clip()
    overrides = {**QUICK, "vocabulary": vocabulary, "cross_modal": False, "cross_distribution": False,
                 "test_negatives": 100}
    with pytest.warns(UserWarning, match="asked for 100 negative labels"):
        run = train_and_evaluate("lapt", clip, embedded_datasets(), shots=16, seed=1, overrides=overrides,
                                 options=RunOptions(progress=False))
    assert run.method.info["cross_distribution_batches"] == 0
    assert len(run.method.negative_labels()[1]) == 14  # 15 words minus the ID name t-shirt


def test_fit_rejects_labels_outside_c_plus_m(vocabulary):
    clip = load_clip()
    method = LAPT(clip, ["dress", "coat"], LAPTConfig(train_negatives=3, test_negatives=3, vocabulary=vocabulary))
    method.prepare(progress=False)
    with pytest.raises(ValueError, match=r"\[0, C\+M=5\)"):
        method.fit(torch.randn(2, 64), torch.tensor([0, 5]), progress=False)
