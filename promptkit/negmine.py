"""NegMine (NegLabel, Jiang et al. ICLR 2024; LAPT's variant): negative labels far from every ID class.

A candidate word's distance to the ID classes is the 95th percentile of its cosines to the ID label
embeddings; the words with the lowest distance are kept. Nouns are prompted "the nice {}", adjectives
"This is a {} photo", ID names "the nice {}". Two ways to split the count between nouns and adjectives:
NegLabel keeps a share (15 %) of each; LAPT keeps exactly M, split in proportion to the pool sizes.

Word embeddings are computed in batches and cached on disk as ``text`` entries of promptkit's cache
(``promptkit.data.cache.CacheEntry``: checksummed, written atomically, a damaged entry rebuilt with a warning),
keyed by the model fingerprint, the template and the sha256 of the word list, so mining the ~71k-word WordNet
vocabulary again is a file read.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from promptkit.assets import VOCABULARY
from promptkit.data.cache import CacheEntry, cache_folder, entry_key
from promptkit.data.errors import DataError

NOUN_TEMPLATE = "the nice {}"
ADJECTIVE_TEMPLATE = "This is a {} photo"
ID_TEMPLATE = NOUN_TEMPLATE
POS = ("noun", "adjective")
# How a candidate's cosines to the C ID labels become its distance: "quantile" (torch.quantile, linear
# interpolation; NegLabel's code) or "sorted-index" (the value at index floor(percentile * C) of the ascending
# cosines; LAPT's released mining, ``get_selected_ood_text_list`` in OpenOOD-VLM).
PERCENTILE_RULES = ("quantile", "sorted-index")
TEXT_KIND = "text"  # the kind of word-embedding cache entries


class WordEncoder(Protocol):
    """What ``embed_words`` needs from a CLIP wrapper."""

    fingerprint: str  # changes whenever the weights change
    embed_dim: int

    def encode_texts(self, texts: list[str], batch_size: int = 256) -> Tensor:
        """``N`` texts -> ``[N,E]`` raw text features."""
        ...


@dataclass(frozen=True)
class MiningTemplates:
    """The prompts NegMine embeds: nouns, adjectives and the ID class names."""

    noun: str = NOUN_TEMPLATE
    adjective: str = ADJECTIVE_TEMPLATE
    id: str = ID_TEMPLATE


# NegLabel's templates, and LAPT's released ones (``wordnet_prepare_via_clip.py``: with a final period; CLIP's
# tokenizer lower-cases, so only the period differs).
MINING_TEMPLATES = {"neglabel": MiningTemplates(),
                    "lapt-code": MiningTemplates("The nice {}.", "This is a {} photo.", "The nice {}.")}


@dataclass(frozen=True)
class Vocabulary:
    """Candidate negative labels: nouns and adjectives (each de-duplicated, in a fixed order)."""

    nouns: tuple[str, ...]
    adjectives: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.nouns and not self.adjectives:
            raise DataError("the NegMine vocabulary is empty")

    def __len__(self) -> int:
        return len(self.nouns) + len(self.adjectives)


def parse_vocabulary(lines: list[str], where: str) -> Vocabulary:
    """Words from ``<pos>\\tword`` lines (pos ``n`` or ``a``) or plain ``word`` lines (nouns); ``#`` comments."""
    parts: dict[str, dict[str, None]] = {"n": {}, "a": {}}  # dicts: ordered de-duplication
    for lineno, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pos, sep, word = line.partition("\t")
        if not sep:
            pos, word = "n", line
        if pos not in parts or not word.strip():
            raise DataError(f"{where}:{lineno}: expected 'word', 'n<TAB>word' or 'a<TAB>word', got {raw!r}")
        parts[pos][word.strip()] = None
    return Vocabulary(tuple(parts["n"]), tuple(parts["a"]))


def read_vocabulary(path: str | os.PathLike[str]) -> Vocabulary:
    """A word list file (plain or ``.gz``): see ``parse_vocabulary`` for the line format."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"vocabulary file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: unreadable vocabulary ({error})") from error
    return parse_vocabulary(lines, str(path))


@functools.lru_cache(maxsize=1)
def default_vocabulary() -> Vocabulary:
    """The shipped WordNet 3.0 vocabulary (59,123 nouns and 12,301 adjectives; see promptkit/assets/README.md)."""
    return read_vocabulary(VOCABULARY)


def load_vocabulary(spec: str | os.PathLike[str] | None) -> Vocabulary:
    """``None``: the shipped WordNet list; else a word list file."""
    return default_vocabulary() if spec is None else read_vocabulary(spec)


# -- text embeddings with a cache ---------------------------------------------------------------------

def _words_sha(words: list[str] | tuple[str, ...]) -> str:
    return hashlib.sha256("\n".join(words).encode("utf-8")).hexdigest()


def text_cache_entry(clip: WordEncoder, template: str, words: list[str] | tuple[str, ...],
                     cache_dir: str | os.PathLike[str] | None = None) -> CacheEntry:
    """The cache entry of the embeddings of ``words`` in ``template`` by ``clip`` (default folder:
    ``default_cache_dir()``)."""
    key = entry_key(TEXT_KIND, clip.fingerprint, template, _words_sha(words))
    return CacheEntry(cache_folder(cache_dir), TEXT_KIND, key)


def _cached_embeddings(entry: CacheEntry, n_words: int, embed_dim: int) -> Tensor | None:
    """The stored embeddings of ``entry``, or None when it is absent or damaged (warned; then rebuilt)."""

    def decode(index: dict[str, Any]) -> Tensor:
        features = entry.read_tensors()[0]["features"]
        if index["n_words"] != n_words or features.dtype != torch.float32 or features.shape != (n_words, embed_dim):
            raise ValueError(f"expected float32 [{n_words}, {embed_dim}] embeddings, got {features.dtype} "
                             f"{list(features.shape)}")
        return features

    return entry.load(decode)


@torch.no_grad()
def embed_words(clip: WordEncoder, words: list[str] | tuple[str, ...], template: str,
                cache_dir: str | os.PathLike[str] | None = None, batch_size: int = 1024, progress: bool = True,
                use_cache: bool = True) -> Tensor:
    """L2-normalised text features [N, E] (fp32, CPU) of ``template.format(word)`` for N words, cached.

    ``use_cache=False`` neither reads nor writes the cache (e.g. for the few ID class names).
    """
    if not words:
        return torch.empty(0, clip.embed_dim)
    entry = text_cache_entry(clip, template, words, cache_dir)
    if use_cache:
        cached = _cached_embeddings(entry, len(words), clip.embed_dim)
        if cached is not None:
            return cached
    texts = [template.format(w) for w in words]
    chunks = []
    bar = tqdm(total=len(texts), unit="word", desc=f"embedding '{template}'",
               disable=not progress or not sys.stderr.isatty(), leave=False)
    # encode_texts sorts each call's texts by length; chunks of a few thousand keep the bar moving
    step = batch_size * 8
    with bar:
        for start in range(0, len(texts), step):
            part = clip.encode_texts(texts[start : start + step], batch_size=batch_size).float().cpu()
            chunks.append(F.normalize(part, dim=-1))
            bar.update(min(step, len(texts) - start))
    features = torch.cat(chunks).contiguous()
    if use_cache:
        entry.write_tensors({"features": features})
        entry.write_index(clip.fingerprint, f"words: {words[0]} ... ({len(words)} words) in {template!r}",
                          template=template, n_words=len(words), embed_dim=int(features.shape[1]))
    return features


# -- mining ---------------------------------------------------------------------------------------------

def word_distances(candidates: Tensor, id_text: Tensor, percentile: float = 0.95, chunk: int = 4096,
                   rule: str = "quantile") -> Tensor:
    """The ``percentile`` point over the C ID labels of each candidate's cosine to them (``rule``: see
    ``PERCENTILE_RULES``). candidates [N, E], id_text [C, E] (both L2-normalised) -> [N]."""
    if not 0 <= percentile <= 1:
        raise ValueError(f"percentile must be in [0, 1], got {percentile}")
    if rule not in PERCENTILE_RULES:
        raise ValueError(f"percentile rule must be one of {PERCENTILE_RULES}, got {rule!r}")
    id_text = id_text.to(candidates)
    index = min(int(id_text.shape[0] * percentile), id_text.shape[0] - 1)

    def point(cos: Tensor) -> Tensor:
        if rule == "quantile":
            return torch.quantile(cos, percentile, dim=1)
        return cos.sort(dim=1).values[:, index]

    out = [point(part @ id_text.T) for part in candidates.split(chunk)]
    return torch.cat(out) if out else candidates.new_empty(0)


def split_counts(n_nouns: int, n_adjectives: int, count: int | None, share: float | None) -> tuple[int, int]:
    """How many nouns and adjectives to keep.

    ``count`` M (LAPT): adj = floor(M * |adj| / (|adj| + |noun|)), nouns = M - adj; M above the pool is cut to
    the pool with a warning. ``share`` (NegLabel): floor(share * |pool|) of each part of speech.
    """
    if (count is None) == (share is None):
        raise ValueError("give exactly one of count (LAPT's proportional split) and share (NegLabel's 15 %)")
    if share is not None:
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share}")
        return int(n_nouns * share), int(n_adjectives * share)
    if count < 1:
        raise ValueError(f"the number of negative labels must be >= 1, got {count}")
    pool = n_nouns + n_adjectives
    if count > pool:
        warnings.warn(f"asked for {count} negative labels but the vocabulary holds {pool} candidates "
                      f"(after removing ID names); using {pool}", stacklevel=3)
        count = pool
    adjectives = count * n_adjectives // pool
    return count - adjectives, adjectives


@dataclass(frozen=True)
class NegativeLabels:
    """Mined negative labels: nouns first, then adjectives, each by ascending distance to the ID labels."""

    words: tuple[str, ...]
    pos: tuple[str, ...]  # "noun" or "adjective" per word
    distances: Tensor  # [M]

    def prompts(self) -> list[str]:
        """The prompted label texts (the NegLabel text-feature inputs)."""
        return [(NOUN_TEMPLATE if p == "noun" else ADJECTIVE_TEMPLATE).format(w) for w, p in zip(self.words, self.pos)]

    def to_json(self) -> dict:
        return {"words": list(self.words), "pos": list(self.pos)}

    def __len__(self) -> int:
        return len(self.words)


def _normalised_name(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


def mine_negative_labels(
    clip,
    class_names: list[str],
    vocabulary: Vocabulary,
    count: int | None = None,
    share: float | None = None,
    percentile: float = 0.95,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    templates: MiningTemplates = MiningTemplates(),
    percentile_rule: str = "quantile",
) -> NegativeLabels:
    """NegMine: the candidates with the lowest ``percentile`` cosine to the ID labels.

    ID class names are removed from the candidates first (case-insensitive). Ties keep vocabulary order, so
    the result is deterministic for a given model and vocabulary. Give ``count`` (LAPT: exactly M, split in
    proportion to the pool sizes) or ``share`` (NegLabel: that share of each part of speech).
    """
    if not class_names:
        raise ValueError("NegMine needs at least one ID class name")
    id_names = {_normalised_name(c) for c in class_names}
    pools = {
        "noun": [w for w in vocabulary.nouns if _normalised_name(w) not in id_names],
        "adjective": [w for w in vocabulary.adjectives if _normalised_name(w) not in id_names],
    }
    n_keep = dict(zip(POS, split_counts(len(pools["noun"]), len(pools["adjective"]), count, share)))
    id_text = embed_words(clip, list(class_names), templates.id, cache_dir, progress=progress, use_cache=False)
    words, pos, distances = [], [], []
    for kind, template in zip(POS, (templates.noun, templates.adjective)):
        if not n_keep[kind]:
            continue
        features = embed_words(clip, pools[kind], template, cache_dir, progress=progress)
        distance = word_distances(features, id_text, percentile, rule=percentile_rule)
        order = torch.sort(distance, stable=True).indices[: n_keep[kind]]
        words += [pools[kind][i] for i in order.tolist()]
        pos += [kind] * len(order)
        distances.append(distance[order])
    if not words:
        raise DataError("NegMine selected no negative labels; raise the count or share")
    return NegativeLabels(tuple(words), tuple(pos), torch.cat(distances))


def negative_labels_from_json(data: dict) -> NegativeLabels:
    """Rebuild saved labels (``NegativeLabels.to_json``); distances are not saved."""
    words, pos = data.get("words"), data.get("pos")
    if not isinstance(words, list) or not isinstance(pos, list) or len(words) != len(pos) or not words:
        raise ValueError("saved negative labels must hold equal, non-empty 'words' and 'pos' lists")
    if any(p not in POS for p in pos):
        raise ValueError(f"saved negative labels: part of speech must be one of {POS}")
    return NegativeLabels(tuple(words), tuple(pos), torch.full((len(words),), float("nan")))

