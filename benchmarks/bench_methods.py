"""One training epoch of each method on cached image features (tiny model, CPU), frozen-text caching on vs off.

"Caching on" encodes the text features of frozen prompts once (NegPrompt's positives in stage 2, LSN's other
negative sets while one set trains); "off" re-encodes them every step. Only the prompts being learned go
through the text encoder in both cases. Run: pytest --benchmark-only benchmarks/bench_methods.py
"""

import pytest
import torch

from promptkit.clip import load_clip
from promptkit.methods import METHODS

# (method, the settings of one epoch of its learned stage)
EPOCHS = {
    "coop": {"epochs": 1},
    "lsn": {"pos_epochs": 0, "neg_epochs": 1},
    "negprompt": {"pos_epochs": 0, "neg_epochs": 1},
}
SHOTS, CLASSES = 16, 6


@pytest.fixture(scope="module")
def clip():
    return load_clip()


# CoOp has no frozen prompts, so it runs once.
CASES = [("coop", True)] + [(m, cached) for m in ("lsn", "negprompt") for cached in (True, False)]


@pytest.mark.parametrize("method,cached", CASES,
                         ids=[f"{m}-{'frozen-text-cached' if c else 'recomputed'}" for m, c in CASES])
def test_training_epoch(benchmark, clip, method, cached):
    benchmark.group = f"{method} one epoch on cached features (C={CLASSES}, {SHOTS} shots)"
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(SHOTS * CLASSES, clip.embed_dim, generator=generator)
    labels = torch.arange(CLASSES).repeat_interleave(SHOTS)
    names = [f"class {i}" for i in range(CLASSES)]
    settings = dict(EPOCHS[method])
    if method != "coop":
        settings["cache_frozen_text"] = cached

    def epoch():
        model = METHODS[method](clip, names, METHODS[method].Config(**settings))
        model.fit(features, labels, progress=False)

    benchmark.pedantic(epoch, rounds=3, warmup_rounds=1, iterations=1)
