"""Each method on the embedded tiny CLIP and images: train a few steps, score, save, reload in a fresh process."""

from __future__ import annotations

import csv

import pytest
import torch

from promptkit.clip import load_clip
from promptkit.data.sources import EmbeddedSource
from promptkit.methods import load_method
from promptkit.pipeline import RunOptions, embedded_datasets, extract, train_and_evaluate

from ..cli_helpers import run_cli

# A few steps of each method: enough to move every learned tensor, fast on a 2-core CPU.
QUICK = {
    "mcm": ("mcm", {}),
    "coop": ("coop", {"epochs": 2}),
    "lsn": ("lsn", {"pos_epochs": 1, "neg_epochs": 1}),
    "lsn-cocoop": ("lsn", {"positive_learner": "cocoop", "pos_epochs": 1, "neg_epochs": 1}),
    "negprompt": ("negprompt", {"pos_epochs": 1, "neg_epochs": 2}),
    "negprompt-official": ("negprompt", {"compat": "official-code", "pos_epochs": 1, "neg_epochs": 2}),
    "lsn-official": ("lsn", {"compat": "official-code", "pos_epochs": 1, "neg_epochs": 1}),
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("feature-cache")


@pytest.mark.parametrize("case", list(QUICK))
def test_train_save_reload_same_scores(case, cache, tmp_path, monkeypatch):
    monkeypatch.setenv("PROMPTKIT_CACHE", str(cache))
    clip = load_clip()
    options = RunOptions(progress=False)
    method, overrides = QUICK[case]
    run = train_and_evaluate(method, clip, embedded_datasets(), shots=4, seed=1, overrides=overrides,
                             options=options)
    metrics = run.metrics
    assert 0 <= metrics["mean"]["auroc"] <= 1 and 0 <= metrics["mean"]["fpr95"] <= 1
    assert set(metrics["ood"]) == {"fashion-heldout", "digits", "textures"}
    assert metrics["id_accuracy"] > 1 / 6  # better than chance on the 6 ID classes
    run.method.save(tmp_path / "prompts")

    # Same process: load the saved prompts and score again.
    features = extract(clip, EmbeddedSource("test"), options).features
    expected, expected_class = run.method.score(features)
    reloaded = load_method(tmp_path / "prompts", clip)
    torch.testing.assert_close(reloaded.score(features)[0], expected)
    assert reloaded.threshold == pytest.approx(run.method.threshold)

    # A fresh process: `promptkit score` on the ID test images gives the same scores and classes.
    out = tmp_path / "scores.csv"
    run_cli("score", "--prompts", str(tmp_path / "prompts"), "--images", "embedded:test", "--output", str(out),
            cwd=tmp_path, cache=cache)
    with open(out) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(expected)
    got = torch.tensor([float(r["score"]) for r in rows], dtype=expected.dtype)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    names = run.method.class_names
    assert [r["predicted_class"] for r in rows] == [names[int(i)] for i in expected_class]
    flagged = sum(r["decision"] == "OOD" for r in rows)
    assert flagged == int((expected < run.method.threshold).sum())


def test_learning_moves_only_the_prompts(cache, monkeypatch):
    monkeypatch.setenv("PROMPTKIT_CACHE", str(cache))
    clip = load_clip()
    before = {k: v.detach().clone() for k, v in clip.model.state_dict().items()}
    run = train_and_evaluate("lsn", clip, embedded_datasets(), shots=2, seed=3, overrides=QUICK["lsn"][1],
                             options=RunOptions(progress=False))
    after = clip.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the frozen CLIP changed"
    state = run.method.state()
    assert state["negative_ctx"].shape[:2] == (3, 6)  # K = 3 sets, class-specific for the 6 ID classes
    untrained = type(run.method)(clip, run.method.class_names, type(run.method.config)(seed=3)).state()
    for name in ("positive_ctx", "negative_ctx"):
        assert not torch.equal(state[name], untrained[name]), f"{name} did not move"
