"""Build the embedded default: train the tiny CLIP and cut the small real image set.

Run ``python -m promptkit.assets.build_default --out DIR`` (``--out promptkit/assets`` refreshes the shipped
files). It needs Debian's Fashion-MNIST (``apt-get install dataset-fashion-mnist``); scikit-learn's digits and
scikit-image's textures come with those packages. Everything is seeded, so a rebuild on the same software
versions reproduces the same files.

Data discipline: the CLIP sees only the Fashion-MNIST *train* split, one part of the digits and the top half
of each texture photo; the image set (``embedded.npz``) is cut from the Fashion-MNIST *test* split, the other
digits and the bottom halves, so no shipped image was used to train the model.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from promptkit.assets import EMBEDDED_IMAGES, EMBEDDED_META, MODEL_CONFIG, MODEL_NAME, MODEL_WEIGHTS
from promptkit.data.atomic import atomic_write

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

# Fashion-MNIST labels in file order, each with the names a caption may use (first = the class name).
FASHION_SYNONYMS: list[list[str]] = [
    ["t-shirt", "top", "tee"],
    ["trouser", "trousers", "pants", "jeans"],
    ["pullover", "sweater", "jumper"],
    ["dress", "gown", "frock"],
    ["coat", "jacket", "overcoat"],
    ["sandal", "sandals", "open shoe"],
    ["shirt", "blouse", "button-up shirt"],
    ["sneaker", "trainer", "running shoe"],
    ["bag", "handbag", "purse"],
    ["ankle boot", "boot", "short boot"],
]
# Indices into FASHION_SYNONYMS: the ID classes (in label order) and the held-out near-OOD classes.
# Each held-out class has a look-alike among the ID classes (shirt ~ t-shirt/coat, sneaker and sandal ~ ankle
# boot) except trouser, so the near-OOD set mixes hard and easy cases.
ID_FASHION = [0, 2, 3, 4, 8, 9]
HELDOUT_FASHION = [1, 5, 6, 7]

_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGIT_SYNONYMS: list[list[str]] = [
    [f"digit {w}", f"number {w}", f"handwritten {w}", f"handwritten digit {d}"] for d, w in enumerate(_NUMBER_WORDS)
]
# scikit-image's bundled CC0 texture photos.
TEXTURES = ["brick", "grass", "gravel"]
TEXTURE_SYNONYMS: list[list[str]] = [
    ["brick wall", "bricks", "brickwork", "masonry"],
    ["grass", "lawn", "turf", "meadow"],
    ["gravel", "pebbles", "stones", "rubble"],
]
# Phrases no training image shows: always-wrong captions, so the text tower learns them as "not this image".
DISTRACTORS = [
    "dog", "cat", "bird", "horse", "fish", "car", "bicycle", "airplane", "boat", "train", "house", "tree",
    "flower", "mountain", "river", "cloud", "face", "hand", "chair", "table", "lamp", "cup", "bottle", "book",
    "phone", "computer", "clock", "ball", "apple", "banana", "pizza", "bridge", "road", "sky", "beach",
    "snow", "fire", "guitar", "umbrella", "hat",
]
TEMPLATES = [
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a close-up photo of a {}.",
    "a small photo of the {}.",
    "a picture of a {}.",
    "{}.",
]
ZERO_SHOT_TEMPLATE = TEMPLATES[0]

SOURCES = {
    "fashion-mnist": "Fashion-MNIST (Zalando SE, 2017), MIT licence; Debian package dataset-fashion-mnist",
    "digits": "UCI Optical Recognition of Handwritten Digits (Alpaydin & Kaynak, 1998), CC BY 4.0; "
    "as bundled with scikit-learn (load_digits)",
    "textures": "scikit-image sample images brick, grass, gravel, each CC0 (CC0Textures / DeviantArt "
    "linolafett), as bundled with scikit-image",
}


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST format): uint8 images ``[N, H, W]`` or labels ``[N]``."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fashion-MNIST as (train images ``[60000,28,28]``, train labels, test images ``[10000,28,28]``, test labels)."""
    names = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {root} (missing {', '.join(missing)}); "
            "install it with `apt-get install dataset-fashion-mnist` or pass --fashion-dir"
        )
    xtr, ytr, xte, yte = (read_idx(root / n) for n in names)
    return xtr, ytr.astype(np.int64), xte, yte.astype(np.int64)


def digits_28() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits as MNIST-like uint8 ``[N,28,28]``: upsampled to 20x20, padded by 4."""
    digits = load_digits()
    x = torch.from_numpy(digits.images).float().unsqueeze(1) * (255.0 / 16.0)
    x = F.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False)
    x = F.pad(x, (4, 4, 4, 4)).squeeze(1)
    return x.round().clamp(0, 255).to(torch.uint8).numpy(), digits.target.astype(np.int64)


def texture_crops(image: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` random square crops (side 28 to 64 px) of a gray ``[H, W]`` image, each resized to uint8 ``[28,28]``."""
    h, w = image.shape
    out = np.empty((n, 28, 28), dtype=np.uint8)
    for i in range(n):
        side = int(rng.integers(28, 65))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = torch.from_numpy(image[top : top + side, left : left + side]).float()[None, None]
        crop = F.interpolate(crop, size=(28, 28), mode="bilinear", antialias=True, align_corners=False)
        out[i] = crop.round().clamp(0, 255).to(torch.uint8).numpy()[0, 0]
    return out


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 gray ``[N,28,28]`` -> float ``[N,3,28,28]`` normalised with OpenAI's mean/std.

    Equal to open_clip's ``preprocess`` for a 28x28 gray PIL image (its resize and crop are identities here).
    """
    x = images.float().div(255.0).unsqueeze(1).expand(-1, 3, -1, -1)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def build_splits(fashion_dir: Path, seed: int, pool_per_class: int, test_per_class: int,
                 heldout_per_class: int, n_digits: int, n_texture: int, train_texture: int,
                 ) -> tuple[dict[str, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Cut the shipped image set and the (disjoint) CLIP training set.

    Returns ``(embedded, (train_images [M,28,28] uint8, train_concepts [M] int64))``; concept ids index
    :func:`concepts` (10 Fashion-MNIST classes, then 10 digits, then the textures).
    """
    rng = np.random.default_rng(seed)
    xtr, ytr, xte, yte = load_fashion(fashion_dir)

    # One seeded shuffle per class; pool and test images are consecutive slices of it.
    shuffled = {c: rng.permutation(np.flatnonzero(yte == c)) for c in range(10)}
    pool = [shuffled[c][:pool_per_class] for c in ID_FASHION]
    test = [shuffled[c][pool_per_class : pool_per_class + test_per_class] for c in ID_FASHION]
    held = np.concatenate([shuffled[c][:heldout_per_class] for c in HELDOUT_FASHION])
    embedded = {
        "train_images": xte[np.concatenate(pool)],
        "train_labels": np.repeat(np.arange(len(ID_FASHION)), pool_per_class).astype(np.int64),
        "test_images": xte[np.concatenate(test)],
        "test_labels": np.repeat(np.arange(len(ID_FASHION)), test_per_class).astype(np.int64),
        "ood_fashion-heldout_images": xte[held],
    }

    dx, dy = digits_28()
    dperm = rng.permutation(len(dx))
    embedded["ood_digits_images"] = dx[dperm[:n_digits]]
    digit_train = dperm[n_digits:]

    import skimage.data  # needed only to rebuild, so not a promptkit dependency

    tex_eval, tex_train = [], []
    per_texture = n_texture // len(TEXTURES)
    for name in TEXTURES:
        photo = getattr(skimage.data, name)()
        half = photo.shape[0] // 2  # top half trains the CLIP, bottom half feeds the shipped set
        tex_train.append(texture_crops(photo[:half], train_texture, rng))
        tex_eval.append(texture_crops(photo[half:], per_texture, rng))
    embedded["ood_textures_images"] = np.concatenate(tex_eval)

    # Digits are few: repeat them so they weigh about as much as the textures in each epoch.
    reps = max(1, (train_texture * len(TEXTURES)) // len(digit_train))
    n_fashion = len(FASHION_SYNONYMS)
    train_x = np.concatenate([xtr, np.tile(dx[digit_train], (reps, 1, 1))] + tex_train)
    train_c = np.concatenate([
        ytr,
        np.tile(dy[digit_train] + n_fashion, reps),
        np.repeat(np.arange(len(TEXTURES)) + n_fashion + len(DIGIT_SYNONYMS), train_texture),
    ]).astype(np.int64)
    _check_disjoint(embedded, train_x)
    return embedded, (train_x, train_c)


def _check_disjoint(embedded: dict[str, np.ndarray], train_x: np.ndarray) -> None:
    """Raise if any shipped image is pixel-identical to a CLIP training image."""
    seen = {img.tobytes() for img in train_x}
    for key, arr in embedded.items():
        if key.endswith("_images"):
            clashes = sum(img.tobytes() in seen for img in arr)
            if clashes:
                raise RuntimeError(f"{key}: {clashes} images also occur in the CLIP training set")


def concepts() -> list[list[str]]:
    """Every captioned concept, each a list of synonyms: Fashion-MNIST (10), digits (10), textures."""
    return FASHION_SYNONYMS + DIGIT_SYNONYMS + TEXTURE_SYNONYMS


def train_clip(model: torch.nn.Module, tokenizer: Callable, images: np.ndarray, targets: np.ndarray,
               epochs: int, batch_size: int, lr: float, seed: int) -> None:
    """Contrastive training against captions: per step each concept gets a random synonym and template.

    Loss: cross-entropy of ``logit_scale * cos(image, caption)`` over all concept captions plus
    ``len(DISTRACTORS) // 2`` distractor captions that are never correct.
    """
    gen = torch.Generator().manual_seed(seed)
    # Every caption is tokenised once; a step only picks indices.
    caption_sets = [[t.format(s) for s in syns for t in TEMPLATES] for syns in concepts()]
    tokens = [tokenizer(c) for c in caption_sets]
    distractor_tokens = tokenizer([t.format(d) for d in DISTRACTORS for t in TEMPLATES])
    n_distract = len(DISTRACTORS) // 2

    x_all = torch.from_numpy(images)
    y_all = torch.from_numpy(targets)
    steps_per_epoch = len(x_all) // batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                pct_start=0.15)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(x_all), generator=gen)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{epochs}", mininterval=5)
        for step in bar:
            idx = perm[step * batch_size : (step + 1) * batch_size]
            pick = [int(torch.randint(len(t), (1,), generator=gen)) for t in tokens]
            text = torch.cat([
                torch.stack([t[p] for t, p in zip(tokens, pick)]),
                distractor_tokens[torch.randperm(len(distractor_tokens), generator=gen)[:n_distract]],
            ])
            img_f = F.normalize(model.encode_image(to_model_input(x_all[idx])), dim=-1)
            txt_f = F.normalize(model.encode_text(text), dim=-1)
            loss = F.cross_entropy(model.logit_scale.exp() * img_f @ txt_f.T, y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, np.log(100.0))  # CLIP's cap on the temperature
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", scale=f"{model.logit_scale.exp().item():.1f}")


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokenizer: Callable, embedded: dict[str, np.ndarray],
             id_names: Sequence[str]) -> dict[str, float]:
    """Zero-shot ID test accuracy and MCM AUROC (max softmax of cos at T=1, ID positive) per OOD set."""
    model.eval()
    text = F.normalize(model.encode_text(tokenizer([ZERO_SHOT_TEMPLATE.format(n) for n in id_names])), dim=-1)

    def cosines(images: np.ndarray) -> torch.Tensor:
        return F.normalize(model.encode_image(to_model_input(torch.from_numpy(images))), dim=-1) @ text.T

    id_cos = cosines(embedded["test_images"])
    labels = torch.from_numpy(embedded["test_labels"])
    metrics = {"zero_shot_accuracy": (id_cos.argmax(1) == labels).float().mean().item()}
    id_score = id_cos.softmax(1).max(1).values.numpy()
    for key in sorted(k for k in embedded if k.startswith("ood_")):
        ood_score = cosines(embedded[key]).softmax(1).max(1).values.numpy()
        y = np.r_[np.ones(len(id_score)), np.zeros(len(ood_score))]
        name = key[len("ood_") : -len("_images")]
        metrics[f"mcm_auroc_{name}"] = float(roc_auc_score(y, np.r_[id_score, ood_score]))
    return metrics


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` a temporary path that becomes ``path`` (``promptkit.data.atomic.atomic_write``), then make
    ``path`` world-readable whatever the umask: the built assets ship with the package."""
    with atomic_write(path) as tmp:
        write(tmp)
    path.chmod(0o644)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Build all default assets into ``--out``; returns the measured metrics."""
    p = argparse.ArgumentParser(prog="python -m promptkit.assets.build_default", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output directory (created if missing)")
    p.add_argument("--fashion-dir", type=Path, default=FASHION_DIR, help="directory with Fashion-MNIST .gz files")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.threads < 1:
        p.error("--epochs, --batch-size and --threads must be positive")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    embedded, (train_x, train_c) = build_splits(
        args.fashion_dir, args.seed, pool_per_class=100, test_per_class=200, heldout_per_class=200,
        n_digits=600, n_texture=600, train_texture=1600,
    )
    open_clip.add_model_config(MODEL_CONFIG)
    model = open_clip.create_model(MODEL_NAME, pretrained=None)
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{MODEL_NAME}: {n_params / 1e6:.2f} M parameters; {len(train_x)} training images")

    start = time.perf_counter()
    train_clip(model, tokenizer, train_x, train_c, args.epochs, args.batch_size, args.lr, args.seed)
    train_seconds = time.perf_counter() - start

    id_names = [FASHION_SYNONYMS[c][0] for c in ID_FASHION]
    metrics = evaluate(model, tokenizer, embedded, id_names)
    print(json.dumps({**metrics, "train_seconds": round(train_seconds, 1)}, indent=2))

    weights = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    _atomic(args.out / MODEL_WEIGHTS.name, lambda t: save_file(weights, str(t), metadata={"seed": str(args.seed)}))

    def write_npz(t: Path) -> None:
        with open(t, "wb") as f:  # a file object: given a path, numpy would append ".npz" to the temporary name
            np.savez_compressed(f, **embedded)

    _atomic(args.out / EMBEDDED_IMAGES.name, write_npz)
    heldout = ", ".join(FASHION_SYNONYMS[c][0] for c in HELDOUT_FASHION)
    meta = {
        "id_classes": id_names,
        "ood_sets": {
            "fashion-heldout": f"near-OOD: held-out Fashion-MNIST test images ({heldout})",
            "digits": "far-OOD: scikit-learn handwritten digits, 8x8 upsampled to 20x20 and padded to 28x28",
            "textures": f"far-OOD: 28x28 crops (28-64 px, resized) of scikit-image textures {', '.join(TEXTURES)}",
        },
        "model": MODEL_NAME,
        "sources": SOURCES,
        "seed": args.seed,
        "caption_vocabulary": {
            "concepts": concepts(),
            "distractors": DISTRACTORS,
            "templates": TEMPLATES,
        },
        "metrics": {**{k: round(v, 4) for k, v in metrics.items()}, "zero_shot_template": ZERO_SHOT_TEMPLATE},
    }
    _atomic(args.out / EMBEDDED_META.name, lambda t: t.write_text(json.dumps(meta, indent=2) + "\n"))
    if (args.out / MODEL_CONFIG.name).resolve() != MODEL_CONFIG:
        _atomic(args.out / MODEL_CONFIG.name, lambda t: shutil.copyfile(MODEL_CONFIG, t))
    return metrics


if __name__ == "__main__":
    main()
