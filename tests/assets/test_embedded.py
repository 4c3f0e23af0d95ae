"""The shipped default (tiny CLIP + image set) loads through open_clip and is good enough to be useful."""

import gzip
import json
import os
import stat

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from sklearn.metrics import roc_auc_score

from promptkit.assets import (
    EMBEDDED_IMAGES,
    EMBEDDED_META,
    MODEL_CONFIG,
    MODEL_NAME,
    MODEL_WEIGHTS,
    build_default,
)

SHIPPED = [MODEL_CONFIG, MODEL_WEIGHTS, EMBEDDED_IMAGES, EMBEDDED_META]
PER_CLASS = 40  # fixed slice of the ID test set used for the accuracy check


@pytest.fixture(scope="module")
def clip():
    """(model in fp32, open_clip preprocess, tokenizer) built from the shipped config and weights."""
    open_clip.add_model_config(MODEL_CONFIG)
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL_NAME, pretrained=str(MODEL_WEIGHTS))
    return model.eval(), preprocess, open_clip.get_tokenizer(MODEL_NAME)


@pytest.fixture(scope="module")
def images():
    with np.load(EMBEDDED_IMAGES) as npz:
        return {k: npz[k] for k in npz.files}


@pytest.fixture(scope="module")
def meta():
    return json.loads(EMBEDDED_META.read_text())


def _encode(model, preprocess, arr):
    """Unit image features ``[N, D]`` through open_clip's own PIL preprocessing."""
    batch = torch.stack([preprocess(Image.fromarray(a)) for a in arr])
    with torch.no_grad():
        return F.normalize(model.encode_image(batch), dim=-1)


def _class_text(model, tokenizer, names):
    with torch.no_grad():
        return F.normalize(model.encode_text(tokenizer([f"a photo of a {n}." for n in names])), dim=-1)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_file_exists_and_is_under_10_mb(path):
    assert path.is_file()
    assert 0 < path.stat().st_size < 10 * 1024 * 1024


def test_weights_are_fp16_and_keep_the_logit_scale():
    with safe_open(str(MODEL_WEIGHTS), framework="pt") as f:
        keys = list(f.keys())
        assert "logit_scale" in keys
        assert {f.get_tensor(k).dtype for k in keys} == {torch.float16}


def test_open_clip_loads_the_weights_as_fp32(clip):
    model, _, _ = clip
    with safe_open(str(MODEL_WEIGHTS), framework="pt") as f:
        shipped = {k: f.get_tensor(k) for k in f.keys()}
    state = model.state_dict()
    assert set(shipped) == set(state)
    for key, value in state.items():
        assert value.dtype == torch.float32, key
        torch.testing.assert_close(value, shipped[key].float(), rtol=0, atol=0)
    assert 1.0 < model.logit_scale.exp().item() <= 100.0
    assert model.context_length >= 32
    n_params = sum(p.numel() for p in model.parameters())
    assert 1e6 < n_params < 5e6


def test_image_set_has_the_documented_keys_shapes_and_labels(images, meta):
    n_id = len(meta["id_classes"])
    assert n_id == 6
    expected = {"train_images", "train_labels", "test_images", "test_labels"}
    expected |= {f"ood_{name}_images" for name in meta["ood_sets"]}
    assert set(images) == expected
    for key in expected:
        arr = images[key]
        if key.endswith("_images"):
            assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[1:] == (28, 28), key
            assert arr.max() > arr.min(), key  # real pictures, not blank
        else:
            assert arr.dtype == np.int64 and arr.ndim == 1, key
    for split, per_class in (("train", 100), ("test", 200)):
        assert len(images[f"{split}_images"]) == len(images[f"{split}_labels"])
        np.testing.assert_array_equal(np.bincount(images[f"{split}_labels"], minlength=n_id), [per_class] * n_id)
    for name in meta["ood_sets"]:
        assert 400 <= len(images[f"ood_{name}_images"]) <= 800, name


def test_metadata_names_model_seed_and_licences(meta):
    assert meta["model"] == MODEL_NAME
    assert isinstance(meta["seed"], int)
    assert set(meta["ood_sets"]) == {"fashion-heldout", "digits", "textures"}
    licences = " ".join(meta["sources"].values())
    for licence in ("MIT", "CC BY 4.0", "CC0"):
        assert licence in licences
    # the text tower saw every class name and more words than those
    seen = {phrase for synonyms in meta["caption_vocabulary"]["concepts"] for phrase in synonyms}
    assert set(meta["id_classes"]) <= seen
    assert len(seen | set(meta["caption_vocabulary"]["distractors"])) > 50


def test_training_transform_equals_open_clip_preprocess(clip, images):
    _, preprocess, _ = clip
    arr = images["test_images"][:4]
    ours = build_default.to_model_input(torch.from_numpy(arr))
    theirs = torch.stack([preprocess(Image.fromarray(a)) for a in arr])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_zero_shot_accuracy_is_well_above_chance(clip, images, meta):
    model, preprocess, tokenizer = clip
    labels = images["test_labels"]
    idx = np.concatenate([np.flatnonzero(labels == c)[:PER_CLASS] for c in range(len(meta["id_classes"]))])
    cos = _encode(model, preprocess, images["test_images"][idx]) @ _class_text(model, tokenizer, meta["id_classes"]).T
    accuracy = (cos.argmax(1).numpy() == labels[idx]).mean()
    assert accuracy > 0.6  # chance is 1/6; the full test set measures ~0.86


def test_mcm_score_separates_every_ood_set(clip, images, meta):
    model, preprocess, tokenizer = clip
    text = _class_text(model, tokenizer, meta["id_classes"])

    def mcm(arr):  # max softmax of cosines at temperature 1
        return (_encode(model, preprocess, arr) @ text.T).softmax(1).max(1).values.numpy()

    id_score = mcm(images["test_images"][::5])
    for name in meta["ood_sets"]:
        ood_score = mcm(images[f"ood_{name}_images"][::4])
        auroc = roc_auc_score(np.r_[np.ones_like(id_score), np.zeros_like(ood_score)], np.r_[id_score, ood_score])
        assert 0.55 < auroc < 0.98, (name, auroc)


# -- the build script's pieces ------------------------------------------------------------------


def _write_idx(path, arr):
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_read_idx_round_trips_images_and_labels(tmp_path):
    imgs = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    labels = np.array([7, 1, 9], dtype=np.uint8)
    _write_idx(tmp_path / "i.gz", imgs)
    _write_idx(tmp_path / "l.gz", labels)
    np.testing.assert_array_equal(build_default.read_idx(tmp_path / "i.gz"), imgs)
    np.testing.assert_array_equal(build_default.read_idx(tmp_path / "l.gz"), labels)


def test_read_idx_rejects_other_formats(tmp_path):
    path = tmp_path / "float.gz"
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 0x0D, 1]) + (1).to_bytes(4, "big") + b"\0\0\0\0")
    with pytest.raises(ValueError, match="IDX"):
        build_default.read_idx(path)


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        build_default.load_fashion(tmp_path)


def test_digits_are_mnist_like():
    x, y = build_default.digits_28()
    assert x.shape == (1797, 28, 28) and x.dtype == np.uint8 and y.shape == (1797,)
    assert not x[:, :4].any() and not x[:, :, -4:].any()  # 4-pixel empty border as in MNIST
    assert x.max() >= 250  # full-ink pixels reach white


def test_texture_crops_are_seeded_and_keep_constant_regions_constant():
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    photo = np.random.default_rng(0).integers(0, 256, (90, 100), dtype=np.uint8)
    a = build_default.texture_crops(photo, 5, rng_a)
    np.testing.assert_array_equal(a, build_default.texture_crops(photo, 5, rng_b))
    assert a.shape == (5, 28, 28) and a.dtype == np.uint8
    flat = build_default.texture_crops(np.full((64, 64), 77, np.uint8), 3, np.random.default_rng(0))
    assert (flat == 77).all()


def test_disjointness_check_catches_a_leaked_image():
    train = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    build_default._check_disjoint({"test_images": train[:2] ^ 1}, train)
    with pytest.raises(RuntimeError, match="test_images: 1 images"):
        build_default._check_disjoint({"test_images": train[3:4]}, train)


def test_atomic_write_publishes_readable_file_and_cleans_up_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    build_default._atomic(target, lambda t: t.write_text("ok"))
    assert target.read_text() == "ok"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o644

    def fail(t):
        t.write_text("partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        build_default._atomic(target, fail)
    assert target.read_text() == "ok"
    assert os.listdir(tmp_path) == ["out.txt"]
