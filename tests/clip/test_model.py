"""Loading: every weights source, the QuickGELU decision, the one-line errors, and the encode helpers."""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU
from PIL import Image
from safetensors.torch import load_file, save_file

import promptkit.clip.model as model_module
from promptkit.clip import ClipModel, ModelLoadError, load_clip, resolve_weights
from promptkit.clip.model import create_model


def _activations(model: torch.nn.Module) -> set[type]:
    """Types of the MLP activations of every residual block (text and image towers)."""
    return {type(m.mlp.gelu) for m in model.modules() if hasattr(m, "mlp") and hasattr(m.mlp, "gelu")}


def _sha16(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# --- local files --------------------------------------------------------------------------------------------


def test_file_loads_exact_weights_frozen(tiny: ClipModel, tiny_weights: Path) -> None:
    expected = load_file(str(tiny_weights))
    state = tiny.model.state_dict()
    assert set(expected) == set(state) - {"attn_mask"}
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    assert not tiny.model.training
    assert not any(p.requires_grad for p in tiny.model.parameters())
    assert tiny.fingerprint == _sha16(tiny_weights)
    assert tiny.pretrained == str(tiny_weights)
    assert (tiny.name, tiny.embed_dim, tiny.context_length) == ("promptkit-tiny", 64, 32)
    assert _activations(tiny.model) == {torch.nn.GELU}


def test_preprocess_and_tokenizer(tiny: ClipModel) -> None:
    image = Image.new("RGB", (40, 30), color=(200, 10, 10))
    x = tiny.preprocess(image)
    assert x.shape == (3, 28, 28)
    mean, std = open_clip.OPENAI_DATASET_MEAN[0], open_clip.OPENAI_DATASET_STD[0]
    assert x[0].mean().item() == pytest.approx((200 / 255 - mean) / std, abs=1e-3)
    tokens = tiny.tokenizer(["a cat", "dog"])
    assert tokens.shape == (2, 32) and tokens.dtype == torch.int64


def test_embedded_branch(monkeypatch: pytest.MonkeyPatch, tiny_weights: Path, tmp_path: Path) -> None:
    monkeypatch.setattr(model_module, "EMBEDDED_WEIGHTS", tiny_weights)
    clip = load_clip()
    assert clip.pretrained == "embedded" and clip.fingerprint == _sha16(tiny_weights)
    missing = tmp_path / "promptkit-tiny.safetensors"
    monkeypatch.setattr(model_module, "EMBEDDED_WEIGHTS", missing)
    with pytest.raises(ModelLoadError, match="embedded weights .*promptkit-tiny.safetensors are missing"):
        load_clip("promptkit-tiny", "embedded")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.safetensors"
    with pytest.raises(ModelLoadError, match=r"weights file not found: .*nope\.safetensors.*--pretrained PATH"):
        load_clip("promptkit-tiny", path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_truncated_file(tiny_weights: Path, tmp_path: Path, suffix: str) -> None:
    if suffix == ".pt":
        full = tmp_path / "full.pt"
        torch.save(load_file(str(tiny_weights)), full)
        data = full.read_bytes()
    else:
        data = tiny_weights.read_bytes()
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=rf"cannot read weights file .*cut\{suffix}") as info:
        load_clip("promptkit-tiny", path)
    assert "\n" not in str(info.value)


def test_wrong_architecture(tiny_weights: Path, tmp_path: Path) -> None:
    state = load_file(str(tiny_weights))
    state.pop("ln_final.bias")
    state["extra.weight"] = torch.zeros(2)
    state["text_projection"] = torch.zeros(64, 32)
    path = tmp_path / "other.safetensors"
    save_file(state, str(path))
    with pytest.raises(ModelLoadError) as info:
        load_clip("promptkit-tiny", path)
    message = str(info.value)
    assert "\n" not in message
    assert "does not fit model 'promptkit-tiny'" in message
    assert "1 missing keys, e.g. ln_final.bias" in message
    assert "1 unexpected keys, e.g. extra.weight" in message
    assert "1 shape mismatches, e.g. text_projection [64, 32] vs [64, 64]" in message


def test_openai_torchscript_file_gets_quick_gelu(tiny: ClipModel, tmp_path: Path) -> None:
    # OpenAI's checkpoints are TorchScript archives whose state dict has open_clip's key names (the causal
    # mask is a plain attribute there, not a buffer): build one from the tiny model
    model, _ = create_model("promptkit-tiny", quick_gelu=False)
    model.load_state_dict(tiny.model.state_dict())
    mask = model._buffers.pop("attn_mask")
    model.attn_mask = mask
    path = tmp_path / "openai-style.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated; torch.load says it dispatches to torch.jit.load
        torch.jit.script(model).save(str(path))
        clip = load_clip("promptkit-tiny", path)
        forced = load_clip("promptkit-tiny", path, quick_gelu=False)
    assert _activations(clip.model) == {QuickGELU}
    assert clip.fingerprint == _sha16(path) + "+quickgelu"
    assert _activations(forced.model) == {torch.nn.GELU} and forced.fingerprint == _sha16(path)
    for key, value in tiny.model.state_dict().items():
        assert torch.equal(clip.model.state_dict()[key], value), key


def test_quick_gelu_can_be_forced_on_a_file(tiny_weights: Path) -> None:
    clip = load_clip("promptkit-tiny", tiny_weights, quick_gelu=True)
    assert _activations(clip.model) == {QuickGELU}
    assert clip.fingerprint == _sha16(tiny_weights) + "+quickgelu"


# --- names and tags ------------------------------------------------------------------------------------------


def test_unknown_model_and_tag() -> None:
    with pytest.raises(ModelLoadError, match="unknown model 'ViT-Q-99'"):
        load_clip("ViT-Q-99", "random")
    with pytest.raises(ModelLoadError, match=r"neither a file nor a pretrained tag of 'ViT-B-16' \(its known tags: "):
        load_clip("ViT-B-16", "no-such-tag")
    with pytest.raises(ModelLoadError, match="hf-hub:/local-dir: names are not supported"):
        load_clip("hf-hub:timm/vit_base_patch16_clip_224.openai")
    with pytest.raises(ModelLoadError, match="has no embedded weights"):
        load_clip("ViT-B-16")
    with pytest.raises(ModelLoadError, match="not a file"):
        load_clip("promptkit-tiny", Path(__file__).parent)


def test_uncached_tag_fails_fast_without_network(tmp_path: Path) -> None:
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match=r"ViT-B-16:openai are not in the local .*--pretrained PATH") as info:
        load_clip("ViT-B-16", "openai", cache_dir=tmp_path)
    assert time.perf_counter() - start < 5
    assert "\n" not in str(info.value)


def test_openai_tag_resolves_to_url_cache_with_quick_gelu(tmp_path: Path) -> None:
    cached = tmp_path / "ViT-B-16.pt"  # where open_clip's URL download puts it
    cached.write_bytes(b"stand-in")
    source = resolve_weights("ViT-B-16", "openai", cache_dir=tmp_path)
    assert source.path == cached
    assert source.quick_gelu is True
    assert source.base_fingerprint == "ViT-B-16:openai"
    assert source.preprocess["mean"] == open_clip.OPENAI_DATASET_MEAN
    assert source.preprocess["interpolation"] == "bicubic"
    assert resolve_weights("ViT-B-16", "openai", quick_gelu=False, cache_dir=tmp_path).quick_gelu is False
    # the same architecture with LAION weights was trained with GELU
    (tmp_path / "vit_b_16-laion400m_e32-55e67d44.pt").write_bytes(b"stand-in")
    assert resolve_weights("ViT-B-16", "laion400m_e32", cache_dir=tmp_path).quick_gelu is False


def test_openai_tag_builds_quick_gelu_model(tmp_path: Path, vit_b16: ClipModel) -> None:
    (tmp_path / "ViT-B-16.pt").write_bytes(b"stand-in")
    source = resolve_weights("ViT-B-16", "openai", cache_dir=tmp_path)
    model, _ = create_model("ViT-B-16", source.quick_gelu, preprocess=source.preprocess)
    assert _activations(model) == {QuickGELU}
    assert _activations(vit_b16.model) == {torch.nn.GELU}  # open_clip's own ViT-B-16 config


def test_tag_resolves_to_hugging_face_cache(tmp_path: Path) -> None:
    # huggingface_hub's cache layout: models--ORG--NAME/{refs/main, snapshots/REVISION/FILE}
    repo = tmp_path / "models--timm--vit_base_patch16_clip_224.openai"
    revision = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_model.safetensors").write_bytes(b"stand-in")
    source = resolve_weights("ViT-B-16", "openai", cache_dir=tmp_path)
    assert source.path == snapshot / "open_clip_model.safetensors"
    assert source.quick_gelu is True
    # the same file passed as a path is recognised as that tag's download
    as_file = resolve_weights("ViT-B-16", str(source.path))
    assert as_file.quick_gelu is True and as_file.preprocess == source.preprocess


def test_random_weights_are_seeded() -> None:
    a = load_clip("promptkit-tiny", "random")
    b = load_clip("promptkit-tiny", "random")
    assert a.fingerprint == "promptkit-tiny:random"
    for key, value in a.model.state_dict().items():
        assert torch.equal(b.model.state_dict()[key], value), key


def test_custom_config_tower(tmp_path: Path) -> None:
    """A config with custom_text keeps its text tower in model.text (CustomTextCLIP)."""
    config = json.loads(model_module.EMBEDDED_CONFIG.read_text())
    config["custom_text"] = True
    (tmp_path / "pk-test-custom-text.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "pk-test-custom-text.json")
    clip = load_clip("pk-test-custom-text", "random")
    assert isinstance(clip.model, open_clip.CustomTextCLIP)
    texts = ["a photo of a dog.", "shirt", "a small gray texture of gravel and stones"]
    expected = clip.model.encode_text(clip.tokenizer(texts))
    assert (clip.encode_texts(texts) - expected).abs().max().item() < 1e-5


# --- encoding ------------------------------------------------------------------------------------------------


def test_encode_images_matches_open_clip(tiny: ClipModel) -> None:
    images = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    got = tiny.encode_images(images)
    assert got.shape == (3, 64) and got.dtype == torch.float32 and not got.requires_grad
    torch.testing.assert_close(got, tiny.model.encode_image(images), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        tiny.encode_images(torch.zeros(3, 28, 28))


def test_encode_texts_matches_open_clip(tiny: ClipModel) -> None:
    texts = [
        "a photo of a sneaker.",
        "bag",
        "a long caption that certainly does not fit into the thirty two tokens of the tiny model's text tower",
        "dress",
        "a blurry photo of an ankle boot",
    ]
    expected = tiny.model.encode_text(tiny.tokenizer(texts))
    for batch_size in (2, 256):
        got = tiny.encode_texts(texts, batch_size=batch_size)
        assert got.shape == (5, 64) and got.dtype == torch.float32
        assert (got - expected).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="single string"):
        tiny.encode_texts("a cat")
    with pytest.raises(ValueError, match="empty"):
        tiny.encode_texts([])
    with pytest.raises(ValueError, match="batch_size"):
        tiny.encode_texts(["a"], batch_size=0)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision(tiny: ClipModel, tiny_weights: Path, precision: str) -> None:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    low = load_clip("promptkit-tiny", tiny_weights, precision=precision)
    assert low.model.transformer.resblocks[0].mlp.c_fc.weight.dtype == dtype
    images = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    texts = ["a cat", "a photo of a shirt"]
    got_images, got_texts = low.encode_images(images), low.encode_texts(texts)
    assert got_images.dtype == got_texts.dtype == torch.float32
    # the wrapper feeds open_clip's low-precision model the way open_clip expects
    with torch.no_grad():
        torch.testing.assert_close(got_images, low.model.encode_image(images.to(dtype)).float(), rtol=0, atol=0)
        expected_texts = low.model.encode_text(low.tokenizer(texts)).float()
    eps = torch.finfo(dtype).eps
    assert (got_texts - expected_texts).abs().max().item() <= 2 * eps * expected_texts.abs().max().item()
    # and the result stays near fp32 (a loose bound: 2 layers of rounding in 8 or 11 mantissa bits)
    for got, ref in ((got_images, tiny.encode_images(images)), (got_texts, tiny.encode_texts(texts))):
        assert (got - ref).abs().max().item() <= 8 * eps * ref.abs().max().item()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="precision must be one of"):
        load_clip("promptkit-tiny", "random", precision="fp8")
    with pytest.raises(ValueError, match="invalid device 'gpu0'"):
        load_clip("promptkit-tiny", "random", device="gpu0")


# --- model config files ----------------------------------------------------------------------------------------


def test_model_config_file_is_registered_and_recorded(tmp_path: Path) -> None:
    config = json.loads(model_module.EMBEDDED_CONFIG.read_text())
    path = tmp_path / "pk-test-from-file.json"
    path.write_text(json.dumps(config))
    clip = load_clip(str(path), "random")
    assert clip.name == str(path.resolve())  # prompts.json records the path: a reload registers it again
    assert clip.fingerprint == f"{path.resolve()}:random"
    assert "pk-test-from-file" in open_clip.list_models()
    texts = ["a dog", "shirt"]
    assert (clip.encode_texts(texts) - clip.model.encode_text(clip.tokenizer(texts))).abs().max().item() < 1e-5
    assert load_clip(str(path), "random").fingerprint == clip.fingerprint


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", r"pk-bad\.json is not readable JSON"),
    ('{"embed_dim": 32, "vision_cfg": {}}', r"does not describe an open_clip CLIP: no text_cfg"),
    ("[1, 2]", r"does not describe an open_clip CLIP: no embed_dim, vision_cfg, text_cfg"),
    ('{"embed_dim": "32", "vision_cfg": {}, "text_cfg": {}}', r"embed_dim must be an integer"),
    ('{"embed_dim": 32, "vision_cfg": {"layers": 1, "nonsense": 3}, "text_cfg": {}}',
     r"cannot build open_clip model 'pk-bad'"),
])
def test_bad_model_config_file_is_one_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "pk-bad.json"
    path.write_text(content)
    with pytest.raises(ModelLoadError, match=message) as info:
        load_clip(str(path), "random")
    assert "\n" not in str(info.value)


def test_config_file_errors_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="model config file not found"):
        load_clip(str(tmp_path / "missing.json"), "random")
    clash = tmp_path / "ViT-B-16.json"
    clash.write_text(json.dumps({**open_clip.get_model_config("ViT-B-16"), "embed_dim": 64}))
    with pytest.raises(ModelLoadError, match="named like the registered model 'ViT-B-16' but differs"):
        load_clip(str(clash), "random")
    assert open_clip.get_model_config("ViT-B-16")["embed_dim"] == 512  # not overwritten


def test_transformers_missing_is_one_line_before_any_work(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = model_module.importlib.util.find_spec
    monkeypatch.setattr(model_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else real(name, *a))
    with pytest.raises(ModelLoadError, match=r"needs the transformers package: pip install 'promptkit\[hf\]'"):
        load_clip("ViT-B-16-SigLIP", "random")
    with pytest.raises(ModelLoadError, match="Hugging Face text tower 'roberta-base' needs the transformers"):
        load_clip("roberta-ViT-B-32", "random")


def test_hugging_face_parts_are_never_downloaded() -> None:
    pytest.importorskip("transformers")
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match=r"tokenizer 'roberta-base' must be a local folder") as info:
        load_clip("roberta-ViT-B-32", "random")
    assert "\n" not in str(info.value) and time.perf_counter() - start < 30
    with pytest.raises(ModelLoadError, match="its Hugging Face text model 'roberta-base' is neither a local folder"):
        create_model("roberta-ViT-B-32", quick_gelu=True)


# --- the QuickGELU decision for weights files -----------------------------------------------------------------


def test_quick_gelu_cannot_be_known_warns_once_with_the_flag(tmp_path: Path) -> None:
    # the README's file name: the Hugging Face name of OpenAI's ViT-B-16 weights and of LAION's (GELU) ones
    path = tmp_path / "open_clip_pytorch_model.bin"
    path.write_bytes(b"stand-in")
    with pytest.warns(UserWarning, match=r"open_clip_pytorch_model\.bin is the file name of both QuickGELU weights "
                                         r"of ViT-B-16 \(openai.*--quick-gelu yes \(quick_gelu=True\)"):
        source = resolve_weights("ViT-B-16", path)
    assert source.quick_gelu is False and source.quick_gelu_from.startswith("assumed")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_weights("ViT-B-16", path).quick_gelu is False  # warned once per file
        flagged = resolve_weights("ViT-B-16", path, quick_gelu=True)
    assert flagged.quick_gelu is True and flagged.quick_gelu_from == "set explicitly (--quick-gelu)"
    other = tmp_path / "finetuned.safetensors"
    other.write_bytes(b"stand-in")
    with pytest.warns(UserWarning, match="the file does not tell"):
        resolve_weights("ViT-B-16", other)


def test_quick_gelu_from_registry_file_names(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # every RN50 tag on the hub is QuickGELU, so its hub file name decides
        (tmp_path / "open_clip_pytorch_model.bin").write_bytes(b"stand-in")
        rn50 = resolve_weights("RN50", tmp_path / "open_clip_pytorch_model.bin")
        assert rn50.quick_gelu is True and rn50.quick_gelu_from.startswith("the Hugging Face file name of RN50")
        # a registry download without a recorded hash (MetaCLIP's b16_400m.pt) is known by its name
        (tmp_path / "b16_400m.pt").write_bytes(b"stand-in")
        metaclip = resolve_weights("ViT-B-16", tmp_path / "b16_400m.pt")
        assert metaclip.quick_gelu is True and "ViT-B-16:metaclip_400m" in metaclip.quick_gelu_from
        # no QuickGELU weights exist for SigLIP: GELU, no warning
        siglip = resolve_weights("ViT-B-16-SigLIP", tmp_path / "b16_400m.pt")
        assert siglip.quick_gelu is False and siglip.quick_gelu_from.startswith("no QuickGELU weights")
        quick = resolve_weights("ViT-B-16-quickgelu", tmp_path / "b16_400m.pt")
        assert quick.quick_gelu is True and quick.quick_gelu_from == "the model config of 'ViT-B-16-quickgelu'"


@pytest.mark.parametrize("host", ["openaipublic", "mlfoundations"])
def test_quick_gelu_from_a_registry_sha256(monkeypatch: pytest.MonkeyPatch, tiny_weights: Path, host: str) -> None:
    """OpenAI's URLs hold the file's sha256, open_clip's release names its first 8 hex digits."""
    digest = hashlib.sha256(tiny_weights.read_bytes()).hexdigest()
    url = (f"https://openaipublic.azureedge.net/clip/models/{digest}/tiny.pt" if host == "openaipublic"
           else f"https://github.com/mlfoundations/open_clip/releases/download/v0/tiny-{digest[:8]}.pt")
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "promptkit-tiny",
                        {"mine": {"url": url, "hf_hub": "", "quick_gelu": True}, "gelu": {"url": "", "hf_hub": ""}})
    source = resolve_weights("promptkit-tiny", tiny_weights)
    assert source.quick_gelu is True
    assert source.quick_gelu_from == "the sha256 of open_clip's promptkit-tiny:mine download"
    assert source.base_fingerprint == digest[:16]
