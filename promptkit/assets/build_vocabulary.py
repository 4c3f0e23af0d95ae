"""Build the shipped NegMine vocabulary (``wordnet_vocabulary.txt.gz``) from the WordNet 3.0 data files.

Run ``python -m promptkit.assets.build_vocabulary --wordnet /usr/share/wordnet --out promptkit/assets``
(Debian: ``apt-get install wordnet-base``). The output is gzip'd text, one ``<pos>\\t<word>`` line per word,
``n`` (noun) lines first, then ``a`` (adjective) lines, each block sorted. The build is deterministic.

Derivation, the choices of NegLabel's corpus and LAPT's de-duplication:
- the first lemma (the synset's name) of every synset in ``data.noun`` and ``data.adj``, ``_`` -> space,
  adjective markers such as ``(a)`` and ``(p)`` removed, de-duplicated; NegLabel's corpus has one name per
  synset too, which gives about 70k words instead of about 120k with every synonym;
- nouns of the lexicographer files ``noun.animal`` (05) and ``noun.food`` (13) are left out, as in NegLabel's
  official corpus (its ``txtfiles/`` holds the other 24 noun files);
- an adjective that is also a noun (compared case-insensitively) is dropped: the noun wins.
"""

from __future__ import annotations

import argparse
import gzip
import re
import shutil
from pathlib import Path
from typing import Sequence

from promptkit.assets import ASSETS_DIR, VOCABULARY
from promptkit.data.atomic import atomic_write

LICENSE_FILE = "WORDNET_LICENSE.txt"
EXCLUDED_NOUN_FILES = {5: "noun.animal", 13: "noun.food"}
_ADJ_MARKER = re.compile(r"\((a|p|ip)\)$")


def synset_name(line: str) -> tuple[int, str]:
    """Lexicographer file number and the first lemma of one ``data.*`` synset line."""
    fields = line.split(" ")  # offset, lex_filenum, ss_type, w_cnt, word, lex_id, ...
    return int(fields[1]), _ADJ_MARKER.sub("", fields[4]).replace("_", " ")


def read_data_file(path: Path, exclude: set[int] = frozenset()) -> set[str]:
    """The synset names of a WordNet ``data.noun``/``data.adj`` file, without the excluded lexicographer files."""
    names: set[str] = set()
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("  "):  # the licence header
                continue
            lex_file, name = synset_name(line)
            if lex_file not in exclude:
                names.add(name)
    return names


def build(wordnet: Path) -> tuple[list[str], list[str]]:
    """Sorted nouns and adjectives of the shipped vocabulary."""
    for name in ("data.noun", "data.adj"):
        if not (wordnet / name).is_file():
            raise FileNotFoundError(f"{wordnet / name}: WordNet data file missing (apt-get install wordnet-base)")
    nouns = read_data_file(wordnet / "data.noun", set(EXCLUDED_NOUN_FILES))
    lowered = {n.lower() for n in nouns}
    adjectives = {a for a in read_data_file(wordnet / "data.adj") if a.lower() not in lowered}
    return sorted(nouns), sorted(adjectives)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m promptkit.assets.build_vocabulary",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--wordnet", type=Path, default=Path("/usr/share/wordnet"), help="WordNet 3.0 dict folder")
    parser.add_argument("--license", type=Path, default=Path("/usr/share/doc/wordnet-base/copyright"),
                        help="the WordNet licence text to ship beside the list")
    parser.add_argument("--out", type=Path, default=ASSETS_DIR)
    args = parser.parse_args(argv)
    nouns, adjectives = build(args.wordnet)
    text = "".join(f"n\t{w}\n" for w in nouns) + "".join(f"a\t{w}\n" for w in adjectives)
    with atomic_write(args.out / VOCABULARY.name) as tmp:
        # mtime=0: the same words give the same bytes
        with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as handle:
            handle.write(text.encode("utf-8"))
    with atomic_write(args.out / LICENSE_FILE) as tmp:
        shutil.copyfile(args.license, tmp)
    print(f"{len(nouns)} nouns, {len(adjectives)} adjectives -> {args.out / VOCABULARY.name}")


if __name__ == "__main__":
    main()
