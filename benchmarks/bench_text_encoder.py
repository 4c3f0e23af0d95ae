"""Prompt-learner text encoding with exact context truncation vs the full context length.

One benchmark group per model, so the truncated/full ratio of each mode reads off the table:

    pytest --benchmark-only benchmarks/bench_text_encoder.py

Weights are random (same cost as trained ones): the tiny config with all 10 classes, and ViT-B-16 with 100
ImageNet classes of which a fixed batch of 8 is encoded per call (a few seconds per call on 2 CPU cores).
"""

from __future__ import annotations

import open_clip
import pytest
import torch

from promptkit.clip import PromptLearner, load_clip

FASHION = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
CASES = {
    # model: (class names, classes encoded per call (None: all), timed rounds)
    "promptkit-tiny": (FASHION, None, 20),
    "ViT-B-16": (list(open_clip.IMAGENET_CLASSNAMES[:100]), torch.arange(8), 5),
}
N_CTX = 16


@pytest.fixture(scope="module")
def learners() -> dict[tuple[str, bool], PromptLearner]:
    built = {}
    for name, (class_names, _, _) in CASES.items():
        clip = load_clip(name, "random")
        torch.manual_seed(0)
        for truncate in (True, False):
            built[name, truncate] = PromptLearner(clip, class_names, n_ctx=N_CTX, truncate=truncate)
    return built


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("truncate", [True, False], ids=["truncated", "full"])
@pytest.mark.parametrize("model_name", list(CASES))
def test_text_encoder(benchmark, learners, model_name: str, truncate: bool, mode: str) -> None:
    learner = learners[model_name, truncate]
    _, classes, rounds = CASES[model_name]
    benchmark.group = f"text encoder {model_name}"
    benchmark.extra_info["positions"] = (
        int(learner.eot_index[classes if classes is not None else slice(None)].max()) + 1
        if truncate
        else learner.encoder.context_length
    )

    if mode == "forward":

        def run() -> torch.Tensor:
            with torch.no_grad():
                return learner(classes)

    else:

        def run() -> torch.Tensor:
            learner.ctx.grad = None
            features = learner(classes)
            features.float().square().sum().backward()
            return features

    features = benchmark.pedantic(run, rounds=rounds, warmup_rounds=1)
    expected_classes = len(classes) if classes is not None else learner.n_classes
    assert features.shape == (1, expected_classes, learner.clip.embed_dim)
