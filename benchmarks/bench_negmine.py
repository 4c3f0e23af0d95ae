"""NegMine over the shipped WordNet vocabulary (words per second, cold vs cached text embeddings). The grouped
NegLabel score at M = 10,000 negatives is timed in bench_scores.py.

Run: ``python -m pytest benchmarks/bench_negmine.py --benchmark-only`` (the words/s rate is in ``extra_info``).
The model is the embedded promptkit-tiny; PROMPTKIT_BENCH_QUICK=1 mines a 2,000-word slice instead.
"""

from __future__ import annotations

import pytest

from promptkit.clip import load_clip
from promptkit.negmine import Vocabulary, default_vocabulary, mine_negative_labels

from .conftest import DEVICE, QUICK

ID_NAMES = ["t-shirt", "pullover", "dress", "coat", "bag", "ankle boot"]


@pytest.fixture(scope="module")
def vocabulary() -> Vocabulary:
    full = default_vocabulary()
    return Vocabulary(full.nouns[:1700], full.adjectives[:300]) if QUICK else full


@pytest.fixture(scope="module")
def clip():
    return load_clip(device=DEVICE)


@pytest.mark.parametrize("cached", [False, True], ids=["cold", "cached"])
def test_negmine_full_vocabulary(benchmark, clip, vocabulary, cached, tmp_path_factory):
    count = 10_000 if not QUICK else 500
    cache = tmp_path_factory.mktemp("text-cache")
    if cached:
        mine_negative_labels(clip, ID_NAMES, vocabulary, count=count, cache_dir=cache, progress=False)

    def once():
        folder = cache if cached else tmp_path_factory.mktemp("cold")  # cold: a new, empty cache every round
        return mine_negative_labels(clip, ID_NAMES, vocabulary, count=count, cache_dir=folder, progress=False)

    benchmark.group = "negmine"
    result = benchmark.pedantic(once, rounds=1 if not cached else 3, iterations=1)
    assert len(result) == count
    benchmark.extra_info["words"] = len(vocabulary)
    benchmark.extra_info["words_per_second"] = round(len(vocabulary) / benchmark.stats.stats.mean)

