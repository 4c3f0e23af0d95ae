"""NegMine (vocabulary, distances, split, ordering, cache) and the NegLabel zero-shot method."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from promptkit.assets import build_vocabulary
from promptkit.clip import load_clip
from promptkit.data.errors import DataError
from promptkit import negmine
from promptkit.methods import load_method
from promptkit.methods.neglabel import NegLabel, NegLabelConfig
from promptkit.negmine import (
    Vocabulary,
    default_vocabulary,
    embed_words,
    mine_negative_labels,
    parse_vocabulary,
    split_counts,
    word_distances,
)
from promptkit.ops import reference


class FakeClip:
    """A 'model' whose text features are hand-chosen 2-D vectors, so distances can be checked by hand."""

    fingerprint = "fake"
    embed_dim = 2

    def __init__(self, vectors: dict[str, tuple[float, float]]):
        self.vectors = vectors
        self.calls = 0

    def encode_texts(self, texts, batch_size=256):
        self.calls += 1
        return torch.tensor([self.vectors[t] for t in texts], dtype=torch.float32)


S = 2 ** -0.5
HAND = {
    "the nice a": (1, 0), "the nice b": (0, 1),  # ID labels
    "the nice n1": (-1, 0), "the nice n2": (0, -1), "the nice n3": (-S, -S), "the nice n4": (S, S),
    "This is a j1 photo": (-1, 0), "This is a j2 photo": (1, 0),
}


def test_hand_checked_ordering_and_proportional_split(tmp_path):
    # distance = 95th percentile (linear) of [cos to a, cos to b] = min + 0.95 (max - min):
    # n1 [-1, 0] -> -0.05, n2 [0, -1] -> -0.05, n3 [-.707, -.707] -> -0.707, n4 -> 0.707; j1 -> -0.05, j2 -> 0.95
    vocab = Vocabulary(("n1", "n2", "n3", "n4", "B"), ("j1", "j2"))  # "B" is an ID name: removed
    clip = FakeClip(HAND)
    # M = 3 from 4 nouns + 2 adjectives: adj = floor(3 * 2 / 6) = 1, nouns = 2
    mined = mine_negative_labels(clip, ["a", "b"], vocab, count=3, cache_dir=tmp_path, progress=False)
    assert mined.words == ("n3", "n1", "j1")  # n1 before n2: equal distances keep vocabulary order
    assert mined.pos == ("noun", "noun", "adjective")
    torch.testing.assert_close(mined.distances, torch.tensor([-S, -0.05, -0.05]))
    assert mined.prompts() == ["the nice n3", "the nice n1", "This is a j1 photo"]
    # NegLabel's share: floor(0.5 * 4) nouns and floor(0.5 * 2) adjectives
    shared = mine_negative_labels(clip, ["a", "b"], vocab, share=0.5, cache_dir=tmp_path, progress=False)
    assert shared.words == ("n3", "n1", "j1")


def test_split_counts():
    assert split_counts(30, 10, 10, None) == (8, 2)
    assert split_counts(58_700, 13_100, 1000, None) == (1000 - 182, 182)  # LAPT's pools: floor(1000 * 13.1/71.8)
    assert split_counts(100, 20, None, 0.15) == (15, 3)
    with pytest.warns(UserWarning, match="holds 12 candidates"):
        assert split_counts(10, 2, 50, None) == (10, 2)
    with pytest.raises(ValueError, match="exactly one"):
        split_counts(10, 2, 5, 0.1)


def test_word_distances_match_numpy_percentile():
    g = torch.Generator().manual_seed(0)
    cand = torch.nn.functional.normalize(torch.randn(37, 8, generator=g), dim=-1)
    ids = torch.nn.functional.normalize(torch.randn(11, 8, generator=g), dim=-1)
    expected = np.percentile((cand @ ids.T).numpy(), 95, axis=1)
    np.testing.assert_allclose(word_distances(cand, ids, 0.95, chunk=5).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_parse_vocabulary_formats_and_errors(tmp_path):
    vocab = parse_vocabulary(["# comment", "dog", "n\tcar", "a\tred", "dog", ""], "x")
    assert vocab.nouns == ("dog", "car") and vocab.adjectives == ("red",)
    with pytest.raises(DataError, match="x:1"):
        parse_vocabulary(["v\trun"], "x")
    path = tmp_path / "words.txt.gz"
    with gzip.open(path, "wt") as handle:
        handle.write("n\tlamp\na\tblue\n")
    assert negmine.read_vocabulary(path) == Vocabulary(("lamp",), ("blue",))
    with pytest.raises(DataError, match="not found"):
        negmine.read_vocabulary(tmp_path / "missing.txt")


def test_shipped_vocabulary():
    vocab = default_vocabulary()
    assert len(vocab.nouns) == 59_123 and len(vocab.adjectives) == 12_301
    assert list(vocab.nouns) == sorted(vocab.nouns) and list(vocab.adjectives) == sorted(vocab.adjectives)
    nouns = {n.lower() for n in vocab.nouns}
    assert not any(a.lower() in nouns for a in vocab.adjectives)
    assert not any("_" in w or w.endswith(("(a)", "(p)")) for w in vocab.nouns + vocab.adjectives)
    # noun.animal and noun.food are left out, like NegLabel's corpus
    assert "gravel" in nouns and "golden retriever" not in nouns and "bagel" not in nouns


def test_build_vocabulary_from_wordnet_lines(tmp_path):
    # data.* lines: offset lex_filenum ss_type w_cnt(hex) word lex_id ...
    (tmp_path / "data.noun").write_text(
        "  1 licence header line\n"
        "00000001 06 n 02 tin_can 0 can 0 000 | a can\n"
        "00000002 05 n 01 dog 0 000 | an animal (noun.animal: left out)\n"
        "00000003 13 n 01 bread 0 000 | a food (noun.food: left out)\n"
        "00000004 03 n 01 Red 0 000 | a noun that is also an adjective\n")
    (tmp_path / "data.adj").write_text(
        "00000005 00 a 01 red 0 000 | also a noun: dropped\n"
        "00000006 00 s 02 big(a) 0 large 0 000 | marker removed, first lemma only\n")
    nouns, adjectives = build_vocabulary.build(tmp_path)
    assert nouns == ["Red", "tin can"]
    assert adjectives == ["big"]


@pytest.fixture(scope="module")
def tiny():
    return load_clip()


def test_mining_on_the_tiny_model_is_deterministic_and_cached(tiny, tmp_path, monkeypatch):
    words = ["gravel", "dog", "grass", "digit seven", "dress", "lamp", "pizza", "sandal", "Coat"]
    vocab = Vocabulary(tuple(words), ("red", "blurry"))
    first = mine_negative_labels(tiny, ["dress", "coat"], vocab, count=5, cache_dir=tmp_path, progress=False)
    assert "dress" not in first.words and "Coat" not in first.words  # ID names removed, case-insensitively
    # independent computation: encode, normalise, numpy percentile, stable sort
    pool = [w for w in words if w.lower() not in ("dress", "coat")]
    nouns = torch.nn.functional.normalize(tiny.encode_texts([f"the nice {w}" for w in pool]), dim=-1)
    ids = torch.nn.functional.normalize(tiny.encode_texts(["the nice dress", "the nice coat"]), dim=-1)
    dist = np.percentile((nouns @ ids.T).numpy(), 95, axis=1)
    n_adj = 5 * 2 // (len(pool) + 2)
    expected = [pool[i] for i in np.argsort(dist, kind="stable")[: 5 - n_adj]]
    assert list(first.words[: 5 - n_adj]) == expected
    # second run: the same labels from the cache, without encoding any candidate
    calls = []
    original = tiny.encode_texts
    monkeypatch.setattr(tiny, "encode_texts", lambda texts, batch_size=256: calls.append(texts) or original(texts))
    again = mine_negative_labels(tiny, ["dress", "coat"], vocab, count=5, cache_dir=tmp_path, progress=False)
    assert again.words == first.words
    assert calls == [["the nice dress", "the nice coat"]]  # only the ID labels (never cached)


def test_embed_words_cache_key_depends_on_template_and_words(tiny, tmp_path):
    a = embed_words(tiny, ["red", "blue"], "the nice {}", tmp_path, progress=False)
    b = embed_words(tiny, ["red", "blue"], "This is a {} photo", tmp_path, progress=False)
    c = embed_words(tiny, ["red", "green"], "the nice {}", tmp_path, progress=False)
    assert len(list(tmp_path.glob("text-*.safetensors"))) == 3
    assert not torch.allclose(a, b) and torch.equal(a[0], c[0]) and not torch.allclose(a[1], c[1])
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(2))


def test_neglabel_score_save_reload(tiny, tmp_path, monkeypatch):
    vocab_file = tmp_path / "words.txt"
    vocab_file.write_text("\n".join(["gravel", "grass", "digit seven", "lamp", "pizza", "sandal", "bicycle",
                                     "cloud", "n\tbrick wall", "a\tred", "a\tsmall"]) + "\n")
    monkeypatch.setenv("PROMPTKIT_CACHE", str(tmp_path / "cache"))
    config = NegLabelConfig(share=0.5, vocabulary=str(vocab_file), groups=2)
    method = NegLabel(tiny, ["t-shirt", "dress"], config)
    method.prepare(progress=False)
    negatives = method.negative_labels()
    assert len(negatives) == 4 + 1  # half of 9 nouns, half of 2 adjectives
    features = torch.randn(7, tiny.embed_dim, generator=torch.Generator().manual_seed(0))
    score, predicted = method.score(features)
    id_text = tiny.encode_texts(["the nice t-shirt", "the nice dress"])
    neg_text = tiny.encode_texts(negatives.prompts())
    torch.testing.assert_close(score, reference.neglabel_score(features, id_text, neg_text, 0.01, 2, 0))
    assert torch.equal(predicted, reference.cosine_logits(features, id_text).argmax(dim=-1))

    method.save(tmp_path / "prompts")
    def no_mining(*args, **kwargs):
        raise AssertionError("a reload mined again")

    monkeypatch.setattr("promptkit.methods.neglabel.mine_negative_labels", no_mining)
    reloaded = load_method(tmp_path / "prompts", tiny)
    assert reloaded.negative_labels().words == negatives.words
    torch.testing.assert_close(reloaded.score(features)[0], score)
