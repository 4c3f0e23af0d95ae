"""The deployed detector: it loads the image tower and the saved text features only, accepts every input kind,
agrees with the method on the full model and with `promptkit score`, and refuses bad input in one line."""

from __future__ import annotations

import csv
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from promptkit import Detector
from promptkit.clip import ImageTower, load_clip
from promptkit.data import EmbeddedSource
from promptkit.data.errors import DataError
from promptkit.methods import load_method
from promptkit.methods.saved import PROMPTS_FILE
from promptkit.pipeline import RunOptions, embedded_datasets, train_and_evaluate

from .cli_helpers import run_cli

README = Path(__file__).resolve().parents[1] / "README.md"
BACKEND = "torch"  # the reference ops: these tests are about loading and plumbing, not the kernels


def _train(root: Path, method: str, overrides: dict, shots: int = 4) -> Path:
    """A run saved the way `promptkit train --method METHOD` saves it, under root/promptkit_runs/METHOD-seed1."""
    options = RunOptions(backend=BACKEND, cache_dir=str(root / "cache"), progress=False)
    run = train_and_evaluate(method, load_clip(), embedded_datasets(), shots, 1, overrides, options)
    return run.method.save(root / "promptkit_runs" / f"{method}-seed1")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("detector")


@pytest.fixture(scope="module")
def runs(root: Path) -> dict[str, Path]:
    return {"coop": _train(root, "coop", {"epochs": 2}), "mcm": _train(root, "mcm", {})}


@pytest.fixture(scope="module")
def images(root: Path) -> list[Path]:
    """Six embedded images as PNG files: three ID test images, three digits."""
    folder = root / "images"
    folder.mkdir()
    paths = []
    for split in ("test", "digits"):
        source = EmbeddedSource(split)
        for i in range(3):
            paths.append(folder / f"{split}-{i}.png")
            source.load(i).save(paths[-1])
    return paths


def test_load_reads_no_text_tower(runs: dict[str, Path]) -> None:
    for method, run in runs.items():
        with safe_open(str(run / PROMPTS_FILE), framework="pt") as handle:
            assert any(key.startswith("head.") for key in handle.keys())
            assert handle.metadata()["method"] == method
        detector = Detector.load(run, backend=BACKEND)
        assert not detector.uses_text_tower and isinstance(detector.clip.model, ImageTower)
        assert detector.clip.tokenizer is None
        full = load_clip()
        assert sum(p.numel() for p in detector.clip.model.parameters()) == \
            sum(p.numel() for p in full.model.visual.parameters())
        assert detector.method.name == method and detector.class_names == EmbeddedSource("test").class_names
        assert f"Detector({method}, 6 classes" in repr(detector)


def test_scores_equal_the_method_on_the_full_model(runs: dict[str, Path]) -> None:
    clip = load_clip()
    features = clip.encode_images(torch.randn(7, 3, 28, 28, generator=torch.Generator().manual_seed(0)))
    for run in runs.values():
        reference, reference_class = load_method(run, clip, backend=BACKEND).score(features)
        scores, predicted = Detector.load(run, backend=BACKEND).score(features, batch_size=3)
        torch.testing.assert_close(scores, reference.cpu(), rtol=0, atol=1e-6)
        assert torch.equal(predicted, reference_class.cpu())


def test_every_input_kind_gives_the_same_predictions(runs: dict[str, Path], images: list[Path]) -> None:
    detector = Detector.load(runs["coop"], backend=BACKEND)
    by_path = detector.predict([str(p) for p in images], batch_size=4)
    assert [p.image for p in by_path] == [str(p) for p in images]
    opened = [Image.open(p) for p in images]
    by_pil = detector.predict(opened)
    assert [p.image for p in by_pil] == [str(p) for p in images]  # a PIL image's filename
    by_folder = detector.predict(images[0].parent)
    assert sorted(p.image for p in by_folder) == sorted(str(p) for p in images)
    pixels = torch.stack([detector.clip.preprocess(Image.open(p).convert("RGB")) for p in images])
    by_tensor = detector.predict(pixels)
    by_features = detector.predict(detector.clip.encode_images(pixels))
    assert [p.image for p in by_tensor] == [None] * len(images)
    folder_order = {p.image: p for p in by_folder}
    for results in (by_pil, [folder_order[str(p)] for p in images], by_tensor, by_features):
        assert [p.label for p in results] == [p.label for p in by_path]
        np.testing.assert_allclose([p.score for p in results], [p.score for p in by_path], rtol=0, atol=1e-6)
    single = detector.predict(images[0])
    assert len(single) == 1 and single[0].score == pytest.approx(by_path[0].score, abs=1e-6)
    unnamed = detector.predict(Image.new("RGB", (28, 28)))
    assert unnamed[0].image == "<image 0>"


def test_threshold_is_the_saved_one_and_can_be_overridden(runs: dict[str, Path], images: list[Path]) -> None:
    detector = Detector.load(runs["coop"], backend=BACKEND)
    assert detector.threshold == detector.method.threshold and detector.threshold is not None
    predictions = detector.predict(images)
    assert all(p.is_id == (p.score >= detector.threshold) for p in predictions)
    assert all(p.decision == ("ID" if p.is_id else "OOD") for p in predictions)
    assert all(p.is_id for p in detector.predict(images, threshold=-1.0))
    assert not any(p.is_id for p in detector.predict(images, threshold=2.0))
    detector.threshold = -1.0
    assert all(p.is_id for p in detector.predict(images))


def test_score_command_is_the_detector(runs: dict[str, Path], images: list[Path], root: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMPTKIT_BACKEND", BACKEND)
    out = root / "scores.csv"
    result = run_cli("score", "--prompts", str(runs["coop"]), "--images", str(images[0].parent), "--output",
                     str(out), cwd=root, cache=root / "cache")
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    expected = {p.image: p for p in Detector.load(runs["coop"], backend=BACKEND).predict(images)}
    assert sorted(row["image"] for row in rows) == sorted(expected)
    for row in rows:
        p = expected[row["image"]]
        assert row["score"] == f"{p.score:.6g}" and row["predicted_class"] == p.label
        assert row["decision"] == p.decision
    flagged = sum(not p.is_id for p in expected.values())
    assert f"scored 6 images (0 unreadable skipped), {flagged} flagged OOD" in result.stdout


def test_bad_input_is_one_line_before_any_work(runs: dict[str, Path], images: list[Path], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    detector = Detector.load(runs["mcm"], backend=BACKEND)

    def no_work(*args, **kwargs):
        raise AssertionError("an image was encoded")

    monkeypatch.setattr(detector.clip, "encode_images", no_work)
    cases = [
        ([], "no images given"),
        ([str(images[0]), str(tmp_path / "missing.png")], r"no such image file: .*missing\.png"),
        ([str(images[0]), 3], "image 1 is a int"),
        (42, "cannot read images from a int"),
        (torch.zeros(2, 5), r"image features must have width 64 .*\[2, 5\]"),
        (torch.zeros(2, 3, 28), r"a tensor must hold features \[B, 64\] or preprocessed images"),
        (torch.zeros(0, 64), "an empty tensor"),
    ]
    for images_in, message in cases:
        with pytest.raises(DataError, match=message) as info:
            detector.predict(images_in)
        assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="batch_size must be an integer >= 1"):
        detector.predict(images, batch_size=0)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="skipped 1 of 2 unreadable images"):
        kept = detector.predict([images[0], broken])
    assert [p.image for p in kept] == [str(images[0])]
    with pytest.raises(DataError, match=r"cannot read image .*broken\.png"):
        detector.predict([images[0], broken], on_bad_image="fail")


def test_prompts_that_need_the_text_tower_load_it(root: Path) -> None:
    """LSN with CoCoOp positives: each image has its own prompts, so no head is saved and the detector runs the
    text tower, with the method's own score."""
    run = _train(root, "lsn", {"positive_learner": "cocoop", "pos_epochs": 1, "neg_epochs": 1}, shots=2)
    with safe_open(str(run / PROMPTS_FILE), framework="pt") as handle:
        assert not any(key.startswith("head.") for key in handle.keys())
    detector = Detector.load(run, backend=BACKEND)
    assert detector.uses_text_tower
    clip = load_clip()
    features = clip.encode_images(torch.randn(4, 3, 28, 28, generator=torch.Generator().manual_seed(1)))
    reference = load_method(run, clip, backend=BACKEND).score(features)[0]
    torch.testing.assert_close(detector.score(features)[0], reference, rtol=0, atol=1e-6)


def test_readme_example_runs_on_the_embedded_default(runs: dict[str, Path], images: list[Path], root: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    section = README.read_text().split("## Deploying a detector", 1)[1].split("\n## ", 1)[0]
    code = textwrap.dedent(re.search(r"```python\n(.*?)```", section, re.S).group(1))
    assert len(code.strip().splitlines()) <= 5
    for name, source in (("shirt.png", images[0]), ("digit.png", images[3])):
        (root / name).write_bytes(source.read_bytes())
    monkeypatch.chdir(root)  # where `promptkit train --method coop` left promptkit_runs/coop-seed1
    monkeypatch.setenv("PROMPTKIT_BACKEND", BACKEND)
    exec(compile(code, str(README), "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("shirt.png") and lines[1].startswith("digit.png")
