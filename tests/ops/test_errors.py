"""Bad input gets one clear ValueError naming the argument; unavailable backends say why."""

import pytest
import torch

from promptkit import ops


@pytest.fixture
def good():
    torch.manual_seed(0)
    return torch.randn(4, 8), torch.randn(3, 8), torch.randn(3, 2, 8), torch.tensor([0, 1, 2, 0])


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_bad_inputs_raise_value_error(good, backend):
    image, pos, neg, labels = good
    nan_image = image.clone()
    nan_image[1, 2] = float("nan")
    inf_neg = neg.clone()
    inf_neg[2, 1, 0] = float("inf")
    nan_lam = torch.tensor([0.5, float("nan"), 0.5, 0.5])
    cases = [
        (lambda: ops.mcm_score(image, torch.randn(3, 5), backend=backend), "feature size 5"),
        (lambda: ops.mcm_score(image[0], pos, backend=backend), "must be 2-D"),
        (lambda: ops.negprompt_score(image, pos, neg[0], backend=backend), "must be 3-D"),
        (lambda: ops.negprompt_score(image, pos, neg[:2], backend=backend), "neg_text has 2 classes"),
        (lambda: ops.mcm_score(image, pos[:0], backend=backend), "empty"),
        (lambda: ops.lsn_score(nan_image, pos, neg, backend=backend), "image contains 1 NaN"),
        (lambda: ops.negprompt_loss(image, pos, inf_neg, backend=backend, labels=labels),
         "neg_text contains 1 NaN or infinite"),
        (lambda: ops.cosine_logits(image, inf_neg, backend=backend), "text contains 1"),
        (lambda: ops.mix_features(image, image, nan_lam, backend=backend), "lam contains 1"),
        (lambda: ops.lsn_negative_loss(image, pos, torch.tensor([0, 1, 3, 0]), backend=backend), "labels must lie"),
        (lambda: ops.lsn_negative_loss(image, pos, labels.float(), backend=backend), "int64"),
        (lambda: ops.lsn_negative_loss(image, pos, labels[:3], backend=backend), "3 entries for 4"),
        (lambda: ops.mcm_score(image, pos, temperature=0.0, backend=backend), "temperature must be > 0"),
        (lambda: ops.min_concept_score(image, neg, neg_temperature=0.0, backend=backend),
         "neg_temperature must be > 0"),
        (lambda: ops.min_concept_score(image, pos, backend=backend), "neg_text must be 3-D"),
        (lambda: ops.soft_cross_entropy(image, pos, torch.rand(4, 2), backend=backend), "targets must be"),
        (lambda: ops.orthogonality_loss(neg, mode="squared", backend=backend), "mode must be one of"),
        (lambda: ops.neglabel_score(image, pos, pos, groups=4, backend=backend), "groups must be"),
        (lambda: ops.mix_features(image, image, torch.rand(3), backend=backend), "lam must be"),
        (lambda: ops.mcm_score(image.long(), pos, backend=backend), "image must be a floating tensor"),
        (lambda: ops.orthogonality_loss(neg[0], backend=backend), "prompts must be 3-D"),
        (lambda: ops.negprompt_loss(image, pos, neg, backend=backend), "nis='msp' needs labels"),
        (lambda: ops.negprompt_loss(image, pos, neg, backend=backend, labels=torch.tensor([0, 1, 3, 0])),
         "labels must lie in \\[0, 3\\)"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_unknown_and_unavailable_backends(good):
    image, pos = good[:2]
    with pytest.raises(ops.BackendUnavailableError, match="unknown backend 'fortran'"):
        ops.mcm_score(image, pos, backend="fortran")
    # CPU tensors: the cuda backend names why it cannot run (not built, or not a CUDA tensor).
    with pytest.raises(ops.BackendUnavailableError, match="'cuda' is unavailable: .*(without CUDA|CUDA tensors)"):
        ops.mcm_score(image, pos, backend="cuda")


def test_auto_prefers_cpp_on_cpu_and_honours_env(monkeypatch):
    monkeypatch.delenv("PROMPTKIT_BACKEND", raising=False)
    assert ops.resolve_backend("auto", torch.device("cpu")) == "cpp"
    monkeypatch.setenv("PROMPTKIT_BACKEND", "torch")
    assert ops.resolve_backend("auto", torch.device("cpu")) == "torch"
    assert ops.resolve_backend("cpp", torch.device("cpu")) == "cpp"  # an explicit choice wins over the env


def test_value_checks_never_read_device_tensors_back():
    """On a GPU the value checks would stall the host every call: on tensors that cannot be read back (meta
    stands in for CUDA here) the finite check is skipped and the label range becomes an asynchronous assert."""
    from promptkit.ops import _checks

    result = torch.empty(3, device="meta")
    assert _checks.finite(result, image=torch.empty(4, 8, device="meta")) is result
    labels = torch.empty(4, dtype=torch.int64, device="meta")
    _checks.labels(labels, 4, 3)
