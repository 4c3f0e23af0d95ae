"""The CoOp prompt learner: exact truncation, agreement with open_clip's encode_text, indexing, gradients."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch

import promptkit.clip.model as model_module
from promptkit.clip import ClipModel, PromptLearner, TextEncoder, load_clip

FASHION = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _positions_run(encoder: TextEncoder, fn) -> list[int]:
    """Sequence lengths the transformer was called with while running ``fn``."""
    seen: list[int] = []
    handle = encoder.transformer.register_forward_hook(lambda m, args, out: seen.append(out.shape[1]))
    try:
        fn()
    finally:
        handle.remove()
    return seen


@pytest.fixture(params=["tiny", "vit_b16"])
def clip_and_names(request: pytest.FixtureRequest) -> tuple[ClipModel, list[str]]:
    if request.param == "tiny":
        return request.getfixturevalue("tiny"), FASHION
    return request.getfixturevalue("vit_b16"), ["goldfish", "great white shark", "tree frog"]


def test_truncated_equals_full_context(clip_and_names: tuple[ClipModel, list[str]]) -> None:
    clip, names = clip_and_names
    torch.manual_seed(0)
    learner = PromptLearner(clip, names, n_ctx=16, n_sets=2)
    full = PromptLearner(clip, names, n_ctx=16, n_sets=2, truncate=False)
    with torch.no_grad():
        full.ctx.copy_(learner.ctx)
    expected_length = int(learner.eot_index.max()) + 1
    assert expected_length < clip.context_length
    assert _positions_run(learner.encoder, learner) == [expected_length]
    assert _positions_run(full.encoder, full) == [clip.context_length]
    got, ref = learner(), full()
    assert got.shape == (2, len(names), clip.embed_dim)
    assert _max_diff(got, ref) < 1e-5


def test_matches_open_clip_encode_text(clip_and_names: tuple[ClipModel, list[str]]) -> None:
    """With ctx initialised from real words, the prompts are ordinary sentences: open_clip is the oracle."""
    clip, names = clip_and_names
    learner = PromptLearner(clip, names, ctx_init="a photo of a", n_sets=2, class_specific=True)
    sentences = [f"a photo of a {name}." for name in names]
    with torch.no_grad():
        expected = clip.model.encode_text(clip.tokenizer(sentences))
    got = learner()
    assert got.shape == (2, len(names), clip.embed_dim)
    assert _max_diff(got[0], expected) < 1e-5 and _max_diff(got[1], expected) < 1e-5


def test_ctx_init_takes_word_embeddings(tiny: ClipModel) -> None:
    learner = PromptLearner(tiny, FASHION, n_ctx=16, ctx_init="a photo of a")
    assert learner.n_ctx == 4 and learner.ctx.shape == (1, 1, 4, 64)
    ids = tiny.tokenizer(["a photo of a"])[0, 1:5]
    torch.testing.assert_close(learner.ctx[0, 0], tiny.model.token_embedding.weight[ids], rtol=0, atol=0)
    assert tiny.tokenizer.decode(ids.tolist()).split() == ["a", "photo", "of", "a"]


def test_random_init_statistics(tiny: ClipModel) -> None:
    torch.manual_seed(1)
    learner = PromptLearner(tiny, FASHION, n_ctx=16, n_sets=3, class_specific=True, init_std=0.05)
    assert learner.ctx.shape == (3, 10, 16, 64)  # 30720 draws: the sample std is within 2 % of the target
    assert learner.ctx.std().item() == pytest.approx(0.05, rel=0.02)
    assert abs(learner.ctx.mean().item()) < 0.002


def test_subsets_of_classes_and_sets(tiny: ClipModel) -> None:
    torch.manual_seed(2)
    for class_specific in (False, True):
        learner = PromptLearner(tiny, FASHION, n_ctx=8, n_sets=3, class_specific=class_specific)
        everything = learner()
        classes, sets = [7, 2, 9], [2, 0]
        part = learner(classes=torch.tensor(classes), sets=sets)
        assert part.shape == (2, 3, 64)
        assert _max_diff(part, everything[sets][:, classes]) < 1e-5
        # the shortest class prompt alone runs on a shorter context
        short = int(learner.eot_index.argmin())
        assert _positions_run(learner.encoder, lambda: learner(classes=[short])) == [int(learner.eot_index[short]) + 1]


def test_gradients_reach_ctx_only_and_match_full_pass(tiny: ClipModel) -> None:
    torch.manual_seed(3)
    learner = PromptLearner(tiny, FASHION, n_ctx=16, n_sets=2)
    full = PromptLearner(tiny, FASHION, n_ctx=16, n_sets=2, truncate=False)
    with torch.no_grad():
        full.ctx.copy_(learner.ctx)
    weights = torch.randn(2, 10, 64, generator=torch.Generator().manual_seed(4))
    for module in (learner, full):
        (module() * weights).sum().backward()
    assert [name for name, _ in learner.named_parameters()] == ["ctx"]
    assert list(learner.state_dict()) == ["ctx"]
    assert learner.ctx.grad is not None and learner.ctx.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in tiny.model.parameters())
    scale = full.ctx.grad.abs().max().item()
    assert _max_diff(learner.ctx.grad, full.ctx.grad) < 1e-5 * max(1.0, scale)


def test_class_name_length_limit(tiny: ClipModel) -> None:
    # 32 positions = SOS + 16 ctx + name + "." + EOS: a name of 13 one-token words fits exactly, 14 do not
    fits = " ".join(["cat"] * 13)
    learner = PromptLearner(tiny, [fits, "dog"], n_ctx=16)
    assert learner.eot_index.tolist() == [31, 3 + 16]
    with pytest.raises(ValueError, match=r"class name 'cat cat .*' \(index 1\) is too long: with n_ctx=16"):
        PromptLearner(tiny, ["dog", fits + " cat"], n_ctx=16)
    PromptLearner(tiny, ["dog", fits + " cat"], n_ctx=15)


def test_set_class_names_transfers_shared_context(tiny: ClipModel) -> None:
    torch.manual_seed(5)
    learner = PromptLearner(tiny, FASHION, n_ctx=6, n_sets=2)
    learner.set_class_names(["gravel", "brick wall", "digit seven"])
    fresh = PromptLearner(tiny, ["gravel", "brick wall", "digit seven"], n_ctx=6, n_sets=2)
    with torch.no_grad():
        fresh.ctx.copy_(learner.ctx)
    assert learner.n_classes == 3
    assert _max_diff(learner(), fresh()) < 1e-6
    specific = PromptLearner(tiny, FASHION, n_ctx=6, class_specific=True)
    with pytest.raises(ValueError, match="learned for 10 classes, got 2"):
        specific.set_class_names(["a", "b"])


def test_bad_arguments(tiny: ClipModel) -> None:
    with pytest.raises(ValueError, match="n_sets must be >= 1"):
        PromptLearner(tiny, FASHION, n_sets=0)
    with pytest.raises(ValueError, match="n_ctx must be >= 1"):
        PromptLearner(tiny, FASHION, n_ctx=0)
    with pytest.raises(ValueError, match="non-empty list"):
        PromptLearner(tiny, [])
    with pytest.raises(ValueError, match="non-empty list"):
        PromptLearner(tiny, "cat")
    with pytest.raises(ValueError, match="class name 1 is ' '"):
        PromptLearner(tiny, ["cat", " "])
    with pytest.raises(ValueError, match="ctx_init '' has no tokens"):
        PromptLearner(tiny, FASHION, ctx_init="")
    learner = PromptLearner(tiny, FASHION, n_ctx=4, n_sets=2)
    with pytest.raises(ValueError, match=r"classes indices must lie in \[0, 10\)"):
        learner(classes=[3, 10])
    with pytest.raises(ValueError, match=r"sets indices must lie in \[0, 2\)"):
        learner(sets=[-1])
    with pytest.raises(ValueError, match="1-D integer index"):
        learner(classes=torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected embeddings \[P, L, 64\]"):
        learner.encoder(torch.zeros(2, 5, 32), torch.zeros(2, dtype=torch.long))


def test_text_encoder_reproduces_open_clip(vit_b16: ClipModel) -> None:
    encoder = TextEncoder(vit_b16)
    tokens = vit_b16.tokenizer(["a goldfish", "a photo of a tree frog in the rain."])
    with torch.no_grad():
        assert _max_diff(encoder.encode_tokens(tokens), vit_b16.model.encode_text(tokens)) < 1e-5


def test_bidirectional_tower_is_never_truncated(tmp_path: Path) -> None:
    """Without a causal mask every position sees the padding, so cutting it would change the features."""
    config = json.loads(model_module.EMBEDDED_CONFIG.read_text())
    config["text_cfg"]["no_causal_mask"] = True
    (tmp_path / "pk-test-bidirectional.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "pk-test-bidirectional.json")
    clip = load_clip("pk-test-bidirectional", "random")
    learner = PromptLearner(clip, FASHION, ctx_init="a photo of a")
    assert not learner.encoder.truncate
    assert _positions_run(learner.encoder, learner) == [32]
    with torch.no_grad():
        expected = clip.model.encode_text(clip.tokenizer([f"a photo of a {n}." for n in FASHION]))
    assert _max_diff(learner()[0], expected) < 1e-5
    texts = ["a dog", "shirt"]
    assert _max_diff(clip.encode_texts(texts), clip.model.encode_text(clip.tokenizer(texts))) < 1e-5


def test_conditional_prompts_shift_the_context_per_image(tiny):
    from promptkit.clip import ConditionalPromptLearner

    learner = ConditionalPromptLearner(tiny, ["t-shirt", "bag", "ankle boot"], n_ctx=4)
    images = torch.randn(5, tiny.embed_dim, generator=torch.Generator().manual_seed(0))
    features = learner(images)
    assert features.shape == (5, 3, tiny.embed_dim)
    assert not torch.allclose(features[0], features[1])  # each image has its own prompts
    features.sum().backward()
    assert learner.meta_net[0].weight.grad is not None and learner.prompts.ctx.grad is not None
    # With a meta-net that outputs zero, every image's prompts are the plain CoOp prompts of the same context.
    torch.nn.init.zeros_(learner.meta_net[-1].weight)
    torch.nn.init.zeros_(learner.meta_net[-1].bias)
    plain = learner.prompts()[0]
    torch.testing.assert_close(learner(images), plain.expand(5, -1, -1), atol=1e-5, rtol=1e-5)


def test_prompt_embeddings_put_the_given_contexts_between_the_frozen_tokens(tiny: ClipModel) -> None:
    """Both learners assemble prompts with prompt_embeddings: the context slots hold the given vectors, the other
    positions the word embeddings of the tokenised prompt, up to the positions the tower runs."""
    torch.manual_seed(0)
    learner = PromptLearner(tiny, ["t-shirt", "bag", "ankle boot"], n_ctx=3, n_sets=2, class_specific=True)
    ctx = torch.randn(4, 2, 3, learner.encoder.width)
    embeddings, eot, length = learner.prompt_embeddings(ctx, classes=[2, 0])
    assert embeddings.shape == (8, length, learner.encoder.width) and length == int(learner.eot_index.max()) + 1
    assert torch.equal(eot, learner.eot_index[[2, 0]].repeat(4))
    start = learner.ctx_start
    assert torch.equal(embeddings[:, start : start + 3], ctx.reshape(8, 3, -1))
    with torch.no_grad():
        words = learner.encoder.embed(learner.tokens[[2, 0]])[:, :length].repeat(4, 1, 1)
    others = [i for i in range(length) if not start <= i < start + 3]
    assert torch.equal(embeddings[:, others], words[:, others])
    # a shared context ([S, 1, n_ctx, W]) serves every class; forward is encode_context of its own contexts
    shared = learner.prompt_embeddings(ctx[:, :1])[0].reshape(4, 3, length, -1)
    assert torch.equal(shared[:, 0, start : start + 3], shared[:, 2, start : start + 3])
    with torch.no_grad():
        assert torch.equal(learner(classes=[1], sets=[1]), learner.encode_context(learner.ctx[[1]][:, [1]], [1]))
    with pytest.raises(ValueError, match=r"expected contexts of shape \[S, 1 or 3, 3, "):
        learner.prompt_embeddings(ctx[0])


def test_text_encoder_is_built_once_and_rebuilt_after_del(tiny: ClipModel) -> None:
    encoder = tiny.text_encoder
    assert tiny.text_encoder is encoder
    del tiny.text_encoder
    rebuilt = tiny.text_encoder
    assert rebuilt is not encoder and rebuilt.length_rule == encoder.length_rule
