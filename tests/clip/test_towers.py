"""Every open_clip text tower kind in the prompt learner: open_clip's own encode_text is the oracle (fp64), the
truncated pass equals the full one, and each kind runs the positions its length rule says."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from promptkit.clip import ClipModel, ModelLoadError, PromptLearner, TextEncoder, load_clip

from .towers import KINDS

NAMES = ["dog", "goldfish", "tree frog", "shirt"]
# how each kind shortens its context (TextEncoder.length_rule)
RULES = {"pk-causal": "causal", "pk-causal-custom": "causal", "pk-eos": "causal", "pk-siglip": "full",
         "pk-siglip2": "full", "pk-bidirectional": "full", "pk-coca": "padding-mask", "pk-roberta": "padding-mask",
         "pk-bert": "padding-mask"}


def _fp64(path: Path) -> ClipModel:
    clip = load_clip(str(path), "random")
    clip.model.double()
    return clip


def _encode_text(clip: ClipModel, texts: list[str]) -> torch.Tensor:
    """open_clip's encode_text, raw (CoCa normalises by default)."""
    with torch.no_grad():
        return clip.model.encode_text(clip.tokenizer(texts), normalize=False)


def _positions_run(encoder: TextEncoder, fn) -> list[int]:
    """Sequence lengths the tower's transformer was called with while running ``fn``."""
    seen: list[int] = []

    def hook(module, args, kwargs, out) -> None:
        x = kwargs["inputs_embeds"] if encoder.hf else args[0]
        seen.append(x.shape[1])

    handle = encoder.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        fn()
    finally:
        handle.remove()
    return seen


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("kind", list(KINDS))
def test_learned_context_of_real_words_equals_encode_text(tower_configs: dict[str, Path], kind: str) -> None:
    """ctx set to the word embeddings of "a photo of a": the prompts are sentences, so encode_text is the oracle."""
    clip = _fp64(tower_configs[kind])
    learner = PromptLearner(clip, NAMES, ctx_init="a photo of a", n_sets=2)
    full = PromptLearner(clip, NAMES, ctx_init="a photo of a", truncate=False)
    expected = _encode_text(clip, [f"a photo of a {name}." for name in NAMES])
    with torch.no_grad():
        got, reference = learner(), full()
    assert got.dtype == torch.float64 and got.shape == (2, len(NAMES), 32)
    assert _max_diff(got[0], expected) < 1e-12 and _max_diff(got[1], expected) < 1e-12
    assert _max_diff(reference[0], expected) < 1e-12
    assert clip.text_encoder.length_rule == RULES[kind]


@pytest.mark.parametrize("kind", list(KINDS))
def test_truncation_runs_only_what_reaches_the_features(tower_configs: dict[str, Path], kind: str) -> None:
    clip = _fp64(tower_configs[kind])
    torch.manual_seed(0)
    learner = PromptLearner(clip, NAMES, n_ctx=4, n_sets=2)
    full = PromptLearner(clip, NAMES, n_ctx=4, n_sets=2, truncate=False)
    with torch.no_grad():
        full.ctx.copy_(learner.ctx)
    length = clip.context_length
    last = int(learner.eot_index.max())
    # CoCa's legacy mask lets one padding key in; its class token is one more position
    expected = {"causal": last + 1, "full": length, "padding-mask": last + (3 if kind == "pk-coca" else 1)}
    extra = 1 if kind == "pk-coca" else 0
    assert _positions_run(learner.encoder, learner) == [expected[RULES[kind]]]
    assert _positions_run(full.encoder, full) == [length + extra]
    assert learner.encoder.truncate == (RULES[kind] != "full")
    with torch.no_grad():
        assert _max_diff(learner(), full()) < 1e-12
        short = int(learner.eot_index.argmin())  # a subset runs on its own, shorter context
        assert _max_diff(learner(classes=[short]), full(classes=[short])) < 1e-12


@pytest.mark.parametrize("kind", list(KINDS))
def test_encode_texts_matches_encode_text(tower_configs: dict[str, Path], kind: str) -> None:
    clip = _fp64(tower_configs[kind])
    texts = ["a dog", "a photo of the small bird in the rain .", "fish", "a blurry photo of a bag"]
    expected = _encode_text(clip, texts)
    for batch_size in (1, 3):  # batches of different lengths
        assert _max_diff(clip.encode_texts(texts, batch_size=batch_size), expected) < 1e-6  # fp32 output


def test_start_token_and_placeholders_per_tokenizer(tower_configs: dict[str, Path]) -> None:
    """CLIP and RoBERTa start with [SOS]/<s>, SigLIP's tokenizer has none; BPE gives 'X' and 'ĠX' two ids."""
    starts = {}
    for kind in ("pk-causal", "pk-siglip", "pk-roberta"):
        clip = load_clip(str(tower_configs[kind]), "random")
        learner = PromptLearner(clip, NAMES, n_ctx=3)
        starts[kind] = learner.ctx_start
        assert learner.token_prefix.shape[1] == learner.ctx_start
    assert starts == {"pk-causal": 1, "pk-siglip": 0, "pk-roberta": 1}
    roberta = load_clip(str(tower_configs["pk-roberta"]), "random")
    assert len(PromptLearner(roberta, NAMES, n_ctx=3)._layout.placeholder_ids) == 2


@pytest.mark.parametrize("correct", [False, True], ids=["legacy-mask", "correct-mask"])
def test_coca_class_token_masks(tower_configs: dict[str, Path], correct: bool) -> None:
    """open_clip's CoCa builds the legacy (shifted) mask; a tower with correct_cls_mask is exact too."""
    clip = _fp64(tower_configs["pk-coca"])
    clip.model.text.correct_cls_mask = correct
    del clip.text_encoder  # rebuilt for the changed tower
    learner = PromptLearner(clip, NAMES, ctx_init="a photo of a")
    assert learner.encoder.shifted_cls_mask is not correct
    expected = _encode_text(clip, [f"a photo of a {name}." for name in NAMES])
    with torch.no_grad():
        assert _max_diff(learner()[0], expected) < 1e-12
    # a prompt that fills the whole context: the class token's own key opens in the legacy mask
    long_name = " ".join(["dog"] * (clip.context_length - 7))
    filled = PromptLearner(clip, [long_name], ctx_init="a photo of a")
    assert int(filled.eot_index[0]) == clip.context_length - 1
    with torch.no_grad():
        assert _max_diff(filled()[0], _encode_text(clip, [f"a photo of a {long_name}."])) < 1e-12


def test_padding_mask_tower_is_truncated_exactly(tower_configs: dict[str, Path]) -> None:
    """A bidirectional TextTransformer with use_pad_mask (padding masked out of attention) can be cut."""
    clip = _fp64(tower_configs["pk-bidirectional"])
    clip.model.text.use_pad_mask = True
    del clip.text_encoder
    learner = PromptLearner(clip, NAMES, ctx_init="a photo of a")
    assert learner.encoder.length_rule == "padding-mask" and learner.encoder.truncate
    assert _positions_run(learner.encoder, learner) == [int(learner.eot_index.max()) + 1]
    with torch.no_grad():
        assert _max_diff(learner()[0], _encode_text(clip, [f"a photo of a {n}." for n in NAMES])) < 1e-12


def test_describe_says_how_each_tower_is_shortened(tower_configs: dict[str, Path]) -> None:
    siglip = load_clip(str(tower_configs["pk-siglip"]), "random").text_encoder.describe()
    assert siglip["attention"] == "bidirectional" and siglip["pooling"] == "last"
    assert siglip["length"].startswith("full context")
    coca = load_clip(str(tower_configs["pk-coca"]), "random").text_encoder.describe()
    assert coca["pooling"] == "class token" and coca["padding_mask"] and "masked" in coca["length"]
    roberta = load_clip(str(tower_configs["pk-roberta"]), "random").describe()
    assert roberta["text_tower"]["tower"] == "Hugging Face roberta"
    assert roberta["text_tower"]["pooling"] == "MeanPooler"


def test_gradients_reach_ctx_through_every_kind(tower_configs: dict[str, Path]) -> None:
    for kind in ("pk-siglip", "pk-coca", "pk-roberta"):
        clip = load_clip(str(tower_configs[kind]), "random")
        learner = PromptLearner(clip, NAMES, n_ctx=4)
        learner().square().sum().backward()
        assert learner.ctx.grad is not None and learner.ctx.grad.abs().sum() > 0, kind
        assert all(p.grad is None for p in clip.model.parameters()), kind


def test_tower_without_a_sentence_feature_fails_at_load(tower_configs: dict[str, Path], tmp_path: Path) -> None:
    """Checked when the model loads, before any image is encoded (MCM and NegLabel encode texts only later)."""
    import json

    config = json.loads(tower_configs["pk-causal-custom"].read_text())
    config["text_cfg"]["pool_type"] = "none"
    path = tmp_path / "pk-no-pooling.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="text pooling 'none' gives no sentence feature") as info:
        load_clip(str(path), "random")
    assert "\n" not in str(info.value)
    assert load_clip(str(path), "random", text_tower=False).has_text_tower is False  # images alone still load
