"""OOD scores on every backend against the plain-torch reference (and a few hand-computed values)."""

import math

import pytest
import torch

from promptkit import ops
from promptkit.ops import reference

from .conftest import assert_matches_reference, backend_params, make_inputs


def _score_calls(image, pos, neg):
    negatives = neg.reshape(-1, neg.shape[-1])
    groups = min(3, negatives.shape[0])
    return {
        "mcm": lambda backend, i, p, n, m: ops.mcm_score(i, p, temperature=0.7, backend=backend),
        "negprompt": lambda backend, i, p, n, m: ops.negprompt_score(i, p, n, temperature=0.5, backend=backend),
        "lsn": lambda backend, i, p, n, m: ops.lsn_score(i, p, n, temperature=1.0, neg_temperature=5.0,
                                                          backend=backend),
        "min_concept": lambda backend, i, p, n, m: ops.min_concept_score(i, n, neg_temperature=3.0, backend=backend),
        "neglabel": lambda backend, i, p, n, m: ops.neglabel_score(i, p, m, temperature=0.01, groups=groups,
                                                                   seed=3, backend=backend),
    }


@pytest.mark.parametrize("backend,device,dtype,shape", backend_params())
def test_scores_match_reference(backend, device, dtype, shape):
    image, pos, neg = make_inputs(shape, dtype, device)[:3]
    negatives = neg.reshape(-1, shape[-1])
    for name, call in _score_calls(image, pos, neg).items():
        out = call(backend, image, pos, neg, negatives)
        ref = call("torch", image, pos, neg, negatives)
        ref64 = call("torch", image.double(), pos.double(), neg.double(), negatives.double())
        assert_matches_reference(out, ref, ref64, what=f"{name} score")


def test_mcm_hand_computed():
    # Two classes; the image is aligned with class 0 (cos 1) and orthogonal to class 1 (cos 0), T = 1.
    image = torch.tensor([[2.0, 0.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    expected = math.exp(1) / (math.exp(1) + 1)
    for backend in ("torch", "cpp"):
        assert ops.mcm_score(image, text, backend=backend).item() == pytest.approx(expected, rel=1e-6)


def test_lsn_score_hand_computed():
    # C = 2, K = 1: cos to positives (1, 0); cos to negatives (0, 1) at neg_T = 5.
    image = torch.tensor([[1.0, 0.0]])
    pos = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    neg = torch.tensor([[[0.0, 1.0]], [[1.0, 0.0]]])
    mcm = math.exp(1) / (math.exp(1) + 1)
    min_cm = 1 / (1 + math.exp(1 / 5))  # min over classes of softmax((0, 1) / 5)
    for backend in ("torch", "cpp"):
        assert ops.lsn_score(image, pos, neg, backend=backend).item() == pytest.approx(mcm - min_cm, rel=1e-6)
        assert ops.min_concept_score(image, neg, backend=backend).item() == pytest.approx(min_cm, rel=1e-6)


def test_neglabel_grouping_hand_computed():
    # One ID label (cos 1) and five negatives (cos 0) in 2 groups: one negative is dropped (M % groups) and
    # each group of 2 has ID mass e / (e + 2) at T = 1.
    image = torch.tensor([[1.0, 0.0]])
    id_text = torch.tensor([[1.0, 0.0]])
    neg = torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.0, 0.5], [0.0, 1.0], [0.0, 3.0]])
    for backend in ("torch", "cpp"):
        score = ops.neglabel_score(image, id_text, neg, temperature=1.0, groups=2, seed=0, backend=backend)
        assert score.item() == pytest.approx(math.e / (math.e + 2), rel=1e-6)


def test_neglabel_permutation_is_seeded_and_device_independent():
    first, again = reference.neglabel_permutation(50, seed=7), reference.neglabel_permutation(50, seed=7)
    assert torch.equal(first, again)
    assert not torch.equal(first, reference.neglabel_permutation(50, seed=8))
    assert sorted(first.tolist()) == list(range(50))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_neglabel_many_groups_match_reference(backend):
    # NegLabel's protocol: 100 groups; M = 1010 leaves a remainder for the permutation to drop.
    image, pos = make_inputs((4, 5, 1, 16), torch.float32, "cpu")[:2]
    negatives = torch.randn(1010, 16, generator=torch.Generator().manual_seed(4))
    call = lambda b, *t: ops.neglabel_score(*t, temperature=0.01, groups=100, seed=5, backend=b)  # noqa: E731
    assert_matches_reference(call(backend, image, pos, negatives), call("torch", image, pos, negatives),
                             call("torch", image.double(), pos.double(), negatives.double()), what="neglabel")


def test_neglabel_single_group_is_id_mass():
    image, pos, neg, _ = make_inputs((6, 4, 2, 8), torch.float64, "cpu")
    negatives = neg.reshape(-1, 8)
    probs = torch.softmax(reference.cosine_logits(image, torch.cat([pos, negatives])) / 0.01, dim=-1)
    expected = probs[:, :4].sum(dim=-1)
    torch.testing.assert_close(ops.neglabel_score(image, pos, negatives, groups=1, backend="cpp"), expected)


def test_cpp_scores_in_row_blocks_match_one_pass(monkeypatch):
    """A large [B, N] product is computed in row blocks of one reused buffer (the last block partial)."""
    from promptkit.ops import _primitives

    image, pos, neg = make_inputs((37, 7, 3, 16), torch.float32, "cpu")[:3]
    negatives = neg.reshape(-1, 16)
    calls = _score_calls(image, pos, neg)
    whole = {name: call("cpp", image, pos, neg, negatives) for name, call in calls.items()}
    monkeypatch.setattr(_primitives, "BLOCK_BYTES", 5 * 28 * 4)  # lsn: N = C (1 + K) = 28 columns, 5 rows a block
    for name, call in calls.items():
        torch.testing.assert_close(call("cpp", image, pos, neg, negatives), whole[name], rtol=1e-6, atol=1e-7,
                                   msg=name)
