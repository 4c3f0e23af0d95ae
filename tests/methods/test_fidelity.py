"""Each official-code option against an oracle written here from the released code's formulas (float64), and the
preset mechanism that applies them (an explicit setting always wins)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from promptkit.errors import ConfigError
from promptkit.methods.config import resolve_config
from promptkit.methods.lapt import LAPTConfig
from promptkit.methods.lsn import LSN, LSNConfig, code_orthogonality
from promptkit.negmine import MINING_TEMPLATES, word_distances
from promptkit.methods.negprompt import NegPromptConfig
from promptkit.methods.shared import Stage
from promptkit.ops import reference


def test_presets_apply_before_explicit_settings():
    official = resolve_config(LSNConfig, {"compat": "official-code"})
    assert (official.pos_lr, official.neg_lr, official.ortho, official.ortho_weight) == (1e-3, 2e-3, "code", 1.0)
    assert official.pos_double_softmax and official.double_softmax and official.score_rule == "official"
    assert resolve_config(LSNConfig, {"compat": "official-code", "neg_lr": 0.5}).neg_lr == 0.5
    # CoCoOp's schedule for both stages (Appendix D.0.2), and a user value equal to a CoOp default is kept.
    cocoop = resolve_config(LSNConfig, {"positive_learner": "cocoop"})
    assert (cocoop.n_ctx, cocoop.pos_epochs, cocoop.pos_batch_size, cocoop.neg_epochs, cocoop.neg_batch_size) == \
        (4, 10, 1, 10, 1)
    assert resolve_config(LSNConfig, {"positive_learner": "cocoop", "pos_epochs": 50}).pos_epochs == 50
    assert resolve_config(LSNConfig) == LSNConfig()


def test_unknown_preset_value_is_a_config_error():
    with pytest.raises(ConfigError, match="compat must be one of paper, official-code"):
        resolve_config(NegPromptConfig, {"compat": "typo"})


def test_negprompt_official_preset_is_the_released_schedule():
    # osr_nega_prompt.py: SGD(model.parameters(), lr=0.1) (no momentum, no weight decay), batch 64,
    # CosineAnnealingLR(T_max=50); max_epoch 100 (the 'max-epoch' = 15 key is never read); prompts
    # prefix + " " + name without a period; CLIP's logit scale in training; MSP branch.
    c = resolve_config(NegPromptConfig, {"compat": "official-code"})
    assert (c.pos_lr, c.neg_lr, c.momentum, c.weight_decay) == (0.1, 0.1, 0.0, 0.0)
    assert (c.pos_batch_size, c.neg_batch_size, c.pos_epochs, c.neg_epochs) == (64, 64, 100, 100)
    assert (c.lr_schedule, c.prompt_suffix, c.train_temperature, c.nis) == ("restarts-50", "", None, "msp")
    assert NegPromptConfig().nis == "msp"  # the default is the released objective, Eq. 4 an option


def test_restarts_schedule_steps_every_batch_and_every_epoch():
    # The released loop: scheduler.step() after each batch (train_nega_clip) and once more after each epoch
    # (stepsize > 0 in osr_nega_prompt.py). Oracle: CosineAnnealingLR's closed form 0.1 (1 + cos(pi t / 50)) / 2.
    stage = Stage(epochs=3, batch_size=64, lr=0.1, momentum=0.0, lr_schedule="restarts-50")
    param = torch.zeros(1, requires_grad=True)
    optimizer = stage.sgd([param])
    scheduler = stage.scheduler(optimizer, num_samples=64 * 40)
    assert stage.step_scheduler == "batch+epoch"
    seen, t = [], 0
    for _ in range(stage.epochs):
        for _ in range(40):
            seen.append((optimizer.param_groups[0]["lr"], t))
            optimizer.step()
            scheduler.step()
            t += 1
        scheduler.step()
        t += 1
    for lr, step in seen:
        assert lr == pytest.approx(0.1 * (1 + math.cos(math.pi * step / 50)) / 2, abs=1e-12)
    assert max(lr for lr, _ in seen[50:]) > 0.05  # it restarts: the rate rises again after 50 steps


def _official_lsn_ortho(sets: torch.Tensor, k: int) -> torch.Tensor:
    """main_feature_100_upload.py, set k of 3: mean over classes of (cos(t_k, t_j) + cos(t_k, t_l)) / 2."""
    C = sets.shape[1]
    total = sets.new_zeros(())
    for c in range(C):
        pair = sum(torch.dot(sets[k, c], sets[j, c]) / (sets[k, c].norm() * sets[j, c].norm())
                   for j in range(3) if j != k)
        total = total + pair / 2
    return total / C


@pytest.mark.parametrize("k", [0, 1, 2])
def test_lsn_code_orthogonality_matches_the_released_formula(k):
    torch.manual_seed(k)
    sets = torch.randn(3, 5, 8, dtype=torch.float64)
    current = sets[k].clone().requires_grad_()
    others = torch.cat([sets[:k], sets[k + 1:]])
    ours = code_orthogonality(current, others)
    oracle_input = sets.clone()
    oracle_current = sets[k].clone().requires_grad_()
    oracle_input = torch.cat([oracle_input[:k], oracle_current[None], oracle_input[k + 1:]])
    oracle = _official_lsn_ortho(oracle_input, k)
    torch.testing.assert_close(ours, oracle, rtol=1e-12, atol=1e-14)
    ours.backward()
    oracle.backward()
    torch.testing.assert_close(current.grad, oracle_current.grad, rtol=1e-12, atol=1e-14)


def test_lsn_official_double_softmax_losses():
    # positive: F.cross_entropy(F.softmax(similarity * 100)); negative: F.cross_entropy(F.softmax((1 - sim) * 20))
    torch.manual_seed(0)
    image, neg = torch.randn(6, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    sim = F.normalize(image, dim=-1) @ F.normalize(neg, dim=-1).T
    oracle = F.cross_entropy(F.softmax((1 - sim) * 20, dim=1), labels)
    lsn = LSN.__new__(LSN)
    lsn.config, lsn.backend = resolve_config(LSNConfig, {"compat": "official-code"}), "torch"
    torch.testing.assert_close(lsn._negative_loss(image, neg, labels), oracle, rtol=1e-12, atol=1e-14)


def test_neglabel_official_grouping_drops_then_permutes():
    # clip_ood.py grouping: drop the last M % G labels, then permute the rest, then split in G chunks.
    M, G, seed = 23, 5, 0
    kept = reference.neglabel_permutation(M, seed, G, "drop-then-permute")
    generator = torch.Generator().manual_seed(seed)
    oracle = torch.arange(M)[: M - M % G][torch.randperm(M - M % G, generator=generator)]
    assert torch.equal(kept, oracle)
    assert kept.max() < M - M % G  # the dropped labels are the last ones, before any permutation
    other = reference.neglabel_permutation(M, seed, G, "permute-then-drop")
    assert len(other) == len(kept) and not torch.equal(other, kept)


def test_lapt_sorted_index_percentile_and_templates():
    # get_selected_ood_text_list: value_cos.sort(1)[:, int(C * 0.95)]
    torch.manual_seed(1)
    cand, ids = F.normalize(torch.randn(7, 6), dim=-1), F.normalize(torch.randn(30, 6), dim=-1)
    cos = cand @ ids.T
    oracle = cos.sort(dim=1).values[:, int(30 * 0.95)]
    torch.testing.assert_close(word_distances(cand, ids, 0.95, rule="sorted-index"), oracle)
    assert not torch.allclose(word_distances(cand, ids, 0.95), oracle)  # torch.quantile interpolates
    code = resolve_config(LAPTConfig, {"compat": "official-code"})
    assert (code.mining_templates, code.percentile_rule, code.cross_distribution) == \
        ("lapt-code", "sorted-index", False)
    assert MINING_TEMPLATES["lapt-code"].noun.format("cat") == "The nice cat."
    assert MINING_TEMPLATES["lapt-code"].adjective.format("red") == "This is a red photo."


@pytest.mark.parametrize("score_rule", ["paper", "official"])
def test_lsn_cocoop_score_is_the_per_image_mcm_with_the_shared_negatives(score_rule):
    """CoCoOp+LSN (Eq. 13-14 with per-image positives): MCM over each image's own prompts, minus MinCM (paper) or
    plus the released negative term (official) over the shared negative prompts."""
    from promptkit.clip import load_clip

    clip = load_clip()
    config = resolve_config(LSNConfig, {"positive_learner": "cocoop", "score_rule": score_rule})
    method = LSN(clip, ["coat", "dress", "bag"], config, backend="cpp")
    features = torch.randn(5, clip.embed_dim, generator=torch.Generator().manual_seed(0))
    score, predicted = method.score(features)
    with torch.no_grad():
        prompts, neg = method.conditional(features), method.text_features().class_negatives
    unit = F.normalize(features.double(), dim=-1)
    cos = torch.einsum("be,bce->bc", unit, F.normalize(prompts.double(), dim=-1))
    mcm = torch.softmax(cos, dim=-1).amax(dim=-1)
    neg_cos = torch.einsum("be,cke->bkc", unit, F.normalize(neg.double(), dim=-1))  # [B, K, C]
    if score_rule == "paper":
        expected = mcm - torch.softmax(neg_cos / 5.0, dim=-1).amin(dim=-1).mean(dim=1)
    else:
        expected = mcm + torch.softmax(-neg_cos / 5.0, dim=-1).amax(dim=-1).mean(dim=1)
    torch.testing.assert_close(score.double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(predicted, cos.argmax(dim=-1))
