"""A second embedded-style split, to check that results on the embedded default are not an artefact of its split.

ID: 6 other Fashion-MNIST classes (trouser, pullover, dress, sandal, sneaker, bag); near-OOD: the other 4
(t-shirt, coat, shirt, ankle boot); far-OOD: the embedded digits and textures. Images come from Fashion-MNIST's
test split (the tiny CLIP trained on its train split): 100 training and 200 test images per ID class, 200 per
near-OOD class, drawn with seed 0. Needs Debian's dataset-fashion-mnist.

    python benchmarks/second_split.py DIR
    promptkit compare --methods mcm,negprompt --train DIR/train --id DIR/test \
        --ood fashion-heldout=DIR/ood/fashion-heldout --ood digits=DIR/ood/digits --ood textures=DIR/ood/textures
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from promptkit.assets import EMBEDDED_IMAGES
from promptkit.assets.build_default import FASHION_DIR, FASHION_SYNONYMS, load_fashion

ID_CLASSES = [1, 2, 3, 5, 7, 8]
NEAR_OOD = [0, 4, 6, 9]


def write(images: np.ndarray, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:04d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--fashion-dir", type=Path, default=FASHION_DIR)
    args = parser.parse_args()
    _, _, images, labels = load_fashion(args.fashion_dir)
    rng = np.random.default_rng(0)
    for c in ID_CLASSES + NEAR_OOD:
        picked = rng.permutation(np.flatnonzero(labels == c))
        name = FASHION_SYNONYMS[c][0]
        if c in ID_CLASSES:
            write(images[picked[:100]], args.output / "train" / name)
            write(images[picked[100:300]], args.output / "test" / name)
        else:
            write(images[picked[:200]], args.output / "ood" / "fashion-heldout" / name)
    embedded = np.load(EMBEDDED_IMAGES)
    for name in ("digits", "textures"):
        write(embedded[f"ood_{name}_images"], args.output / "ood" / name)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
