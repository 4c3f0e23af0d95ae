"""The Method contract: a new method needs only its class and a registry entry; the pipeline and the CLI never
name a method."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from promptkit.clip import load_clip
from promptkit.data.sources import EmbeddedSource
from promptkit.methods import METHODS, Method, TextFeatures, TrainingData, load_method, load_scorer
from promptkit.ops import reference
from promptkit.pipeline import RunOptions, embedded_datasets, extract, train_and_evaluate

PACKAGE = Path(__file__).resolve().parents[2] / "promptkit"


@dataclass
class CentroidConfig:
    temperature: float = 1.0
    seed: int = 1


class Centroid(Method):
    """A seventh method for the test: the mean image feature of each class as its 'prompt', scored with MCM."""

    name = "centroid"
    Config = CentroidConfig

    def __init__(self, clip, class_names, config=None, backend="auto"):
        super().__init__(clip, class_names, config, backend)
        self.centroids = torch.zeros(len(self.class_names), clip.embed_dim)
        self.fitted_on: tuple[int, int] | None = None

    def _fit(self, features: Tensor, labels: Tensor, progress: bool) -> None:
        self.fitted_on = (len(labels), int(labels.max()))
        unit = F.normalize(features.float(), dim=-1)
        self.centroids.copy_(torch.stack([unit[labels == c].mean(dim=0) for c in range(len(self.class_names))]))

    def _encode_text(self, local: bool) -> TextFeatures:
        return TextFeatures(self.centroids.clone())

    def _score(self, features: Tensor, text: TextFeatures) -> tuple[Tensor, Tensor]:
        score = reference.mcm_score(features, text.id, self.config.temperature)
        return score, reference.cosine_logits(features, text.id).argmax(dim=-1)

    def state(self) -> dict[str, Tensor]:
        return {"centroids": self.centroids}


def test_a_new_method_runs_through_the_pipeline_save_and_reload(tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, Centroid.name, Centroid)
    monkeypatch.setenv("PROMPTKIT_CACHE", str(tmp_path / "cache"))
    clip = load_clip()
    options = RunOptions(progress=False, backend="torch")
    run = train_and_evaluate("centroid", clip, embedded_datasets(), shots=3, seed=1, overrides={}, options=options)
    method = run.method
    assert method.fitted_on == (3 * 6, 5)  # the few-shot ID images, labels in [0, C)
    assert run.metrics["id_accuracy"] > 1 / 6 and method.info["train"]["shots"] == 3
    run.method.save(tmp_path / "run")

    features = extract(clip, EmbeddedSource("test"), options).features
    expected = reference.mcm_score(features, method.centroids, 1.0)
    torch.testing.assert_close(load_method(tmp_path / "run", clip, backend="torch").score(features)[0], expected)
    scorer = load_scorer(tmp_path / "run", clip, backend="torch")  # from the saved head alone
    assert not hasattr(scorer, "centroids")
    torch.testing.assert_close(scorer.score(features)[0], expected)


def test_text_features_are_computed_once_and_again_after_fit(monkeypatch):
    clip = load_clip()
    method = Centroid(clip, ["a", "b"])
    calls = []
    encode = method._encode_text
    monkeypatch.setattr(method, "_encode_text", lambda local: calls.append(local) or encode(local))
    first = method.text_features()
    assert method.text_features() is first and calls == [False]
    method.fit(torch.randn(4, clip.embed_dim), torch.tensor([0, 1, 0, 1]), progress=False)
    assert not torch.equal(method.text_features().id, first.id) and calls == [False, False]
    method.load_state({"centroids": torch.ones(2, clip.embed_dim)})
    assert torch.equal(method.text_features().id, torch.ones(2, clip.embed_dim)) and len(calls) == 3


@pytest.mark.parametrize("module", ["pipeline.py", "cli.py"])
def test_pipeline_and_cli_never_name_a_method(module):
    tree = ast.parse((PACKAGE / module).read_text())
    names = set(METHODS) | {cls.__name__ for cls in METHODS.values()}
    named = [(node.lineno, node.value) for node in ast.walk(tree)
             if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names]
    named += [(node.lineno, node.id) for node in ast.walk(tree) if isinstance(node, ast.Name) and node.id in names]
    assert not named, f"promptkit/{module} names methods: {named}"


CONTRACT = set(dir(Method)) | {"name", "Config", "clip", "class_names", "config", "backend", "threshold", "info"}


@pytest.mark.parametrize("module", ["pipeline.py", "cli.py", "detector.py"])
def test_pipeline_cli_and_detector_use_only_the_contract(module):
    """Every attribute they read off a method (``method.x``, ``cls.x``) is the contract's; none of a config's."""
    tree = ast.parse((PACKAGE / module).read_text())
    used = {(node.lineno, node.attr) for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name) and node.value.id in ("method", "cls")}
    configs = {(node.lineno, node.attr) for node in ast.walk(tree) if isinstance(node, ast.Attribute)
               and isinstance(node.value, ast.Attribute) and node.value.attr == "config"}
    assert used and not {(line, attr) for line, attr in used if attr not in CONTRACT} and not configs


def test_every_registered_method_declares_the_contract():
    for name, cls in METHODS.items():
        assert cls.name == name and isinstance(cls.training_data, TrainingData)
        assert cls.text_kinds[0] == "id" and set(cls.text_kinds) <= {"id", "class_negatives", "label_negatives"}
        assert cls._encode_text is not Method._encode_text and cls._score is not Method._score, name
        learns = cls.training_data is not TrainingData.NONE
        assert (cls._fit is not Method._fit) == learns, name
