"""NegMine over the shipped WordNet vocabulary (words per second, cold vs cached text embeddings) and the
grouped NegLabel score at M = 10,000 negatives.

Run: ``python -m pytest benchmarks/bench_negmine.py --benchmark-only`` (the words/s rate is in ``extra_info``).
The model is the embedded promptkit-tiny; PROMPTKIT_BENCH_QUICK=1 mines a 2,000-word slice instead.
"""

from __future__ import annotations

import pytest
import torch

from promptkit import ops
from promptkit.clip import load_clip
from promptkit.methods.negmine import Vocabulary, default_vocabulary, mine_negative_labels

from .conftest import BATCHES, C, D, DEVICE, IMPLEMENTATIONS, QUICK, features, implementation, run_benchmark

ID_NAMES = ["t-shirt", "pullover", "dress", "coat", "bag", "ankle boot"]


@pytest.fixture(scope="module")
def vocabulary() -> Vocabulary:
    full = default_vocabulary()
    return Vocabulary(full.nouns[:1700], full.adjectives[:300]) if QUICK else full


@pytest.mark.parametrize("cached", [False, True], ids=["cold", "cached"])
def test_negmine_full_vocabulary(benchmark, vocabulary, cached, tmp_path_factory):
    clip = load_clip(device=DEVICE)
    cache = tmp_path_factory.mktemp("text-cache")
    if cached:
        mine_negative_labels(clip, ID_NAMES, vocabulary, count=10_000 if not QUICK else 500, cache_dir=cache,
                             progress=False)
    count = 10_000 if not QUICK else 500

    def once():
        folder = cache if cached else tmp_path_factory.mktemp("cold")  # cold: a new, empty cache every round
        return mine_negative_labels(clip, ID_NAMES, vocabulary, count=count, cache_dir=folder, progress=False)

    benchmark.group = "negmine"
    result = benchmark.pedantic(once, rounds=1 if not cached else 3, iterations=1)
    assert len(result) == count
    benchmark.extra_info["words"] = len(vocabulary)
    benchmark.extra_info["words_per_second"] = round(len(vocabulary) / benchmark.stats.stats.mean)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("batch", BATCHES)
def test_neglabel_score_m10000(benchmark, batch, impl):
    benchmark.group = f"neglabel_score M=10000 groups=100 B={batch}"
    m = 10_000 if not QUICK else 200
    inputs = [features(batch, D, seed=1), features(C, D, seed=2), features(m, D, seed=3)]
    fn = implementation(lambda b, i, p, n: ops.neglabel_score(i, p, n, groups=100, backend=b), impl)
    run_benchmark(benchmark, fn, inputs, backward=False)
    torch.testing.assert_close(fn(*inputs), ops.neglabel_score(*inputs, groups=100, backend="torch"),
                               rtol=1e-4, atol=1e-5)
