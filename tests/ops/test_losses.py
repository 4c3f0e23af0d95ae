"""Prompt losses: value and gradients on every backend against the reference; gradcheck; hand values."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from promptkit import ops

from ._grads import check_forward_backward
from .conftest import backend_params, make_inputs


@pytest.mark.parametrize("backend,device,dtype,shape", backend_params())
def test_lsn_negative_loss(backend, device, dtype, shape):
    image, _, neg, labels = make_inputs(shape, dtype, device)
    fn = lambda b, i, n, y: ops.lsn_negative_loss(i, n, y, temperature=0.05, backend=b)  # noqa: E731
    check_forward_backward(fn, backend, [image, neg[:, 0].contiguous(), labels], "lsn_negative_loss")


@pytest.mark.parametrize("nis", ["msp", "oe", "eq4"])
@pytest.mark.parametrize("backend,device,dtype,shape", backend_params())
def test_negprompt_loss(backend, device, dtype, shape, nis):
    image, pos, neg, labels = make_inputs(shape, dtype, device)
    fn = lambda b, i, p, n: ops.negprompt_loss(i, p, n, beta=0.1, gamma=0.05, temperature=0.01,  # noqa: E731
                                               backend=b, nis=nis, labels=labels)
    check_forward_backward(fn, backend, [image, pos, neg], f"negprompt_loss {nis}")


@pytest.mark.parametrize("nis,npd,nnd", [("msp", "pull", "pairwise"), ("oe", "push", "pairwise"),
                                         ("eq4", "push", "mean")])
@pytest.mark.parametrize("backend,device", [("cpp", "cpu"), ("triton", "cpu")])
def test_negprompt_loss_other_forms(backend, device, nis, npd, nnd):
    # Each branch with the NPD and NND forms "auto" does not pick for it.
    image, pos, neg, labels = make_inputs((5, 3, 2, 7), torch.float64, device)
    fn = lambda b, i, p, n: ops.negprompt_loss(i, p, n, backend=b, nis=nis, labels=labels, npd=npd,  # noqa: E731
                                               nnd=nnd)
    check_forward_backward(fn, backend, [image, pos, neg], f"negprompt_loss {nis} {npd} {nnd}")


def _released_stage2_loss(image, pos, neg, labels, method, logit_scale, distance_weight, nega_nega_weight):
    """mala-lab/NegPrompt core/train_clip.py ``train_nega_clip`` at stage >= 2, step by step in float64: CLIP's
    unit features, logits over the per-class layout [pos_c, neg_c1 .. neg_cp], the "MSP" or "OE" loss on them,
    and the class loops of nega_to_posi and nega_to_nega (the 1e-8 * CE of the frozen positives is left out)."""
    C, p, D = neg.shape
    image = image / image.norm(dim=-1, keepdim=True)
    text = torch.cat([pos[:, None], neg], dim=1)
    text = (text / text.norm(dim=-1, keepdim=True)).reshape(C * (1 + p), D)
    output = logit_scale * image @ text.T
    ensemble = text.view(C, 1 + p, D)
    positive, negative = ensemble[:, 0, :], ensemble[:, 1:, :]
    if method == "msp":
        soft_target = torch.zeros(output.shape, dtype=torch.long)
        soft_target.view(output.shape[0], C, -1)[torch.arange(output.shape[0]), labels, :] = 1
        nega_to_other = nn.MultiLabelSoftMarginLoss(reduction="mean")(output, soft_target)
    else:
        nega_to_other = -(output.mean(1) - torch.logsumexp(output, dim=1)).mean()
    nega_to_nega = 0
    for i in range(C):
        mean_norm = negative[i].mean(dim=0, keepdim=True).norm(dim=-1, keepdim=True)
        nega_to_nega += -torch.mean(1 - negative[i].norm(dim=-1, keepdim=True) @ mean_norm.t())
    nega_to_nega /= C
    all_class_dis = 0
    for i in range(C):
        pos_unit = positive[i:i + 1] / positive[i:i + 1].norm(dim=-1, keepdim=True)
        neg_unit = negative[i] / negative[i].norm(dim=-1, keepdim=True)
        all_class_dis += (1 - pos_unit @ neg_unit.t()).mean()
    nega_to_posi = -all_class_dis / C if method == "msp" else all_class_dis / C
    return nega_to_other + distance_weight * nega_to_posi + nega_nega_weight * nega_to_nega


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("nis", ["msp", "oe"])
def test_negprompt_loss_matches_the_released_code(nis, backend):
    # "auto" gives the released pairing: msp with npd push, nnd mean; oe with npd pull (+d), nnd mean.
    image, pos, neg, labels = make_inputs((6, 4, 3, 9), torch.float64, "cpu")
    leaves = [t.clone().requires_grad_(True) for t in (image, pos, neg)]
    released = _released_stage2_loss(*leaves, labels, nis, 100.0, 0.1, 0.05)
    released.backward()
    ours_leaves = [t.clone().requires_grad_(True) for t in (image, pos, neg)]
    ours = ops.negprompt_loss(*ours_leaves, beta=0.1, gamma=0.05, temperature=0.01, backend=backend, nis=nis,
                              labels=labels)
    ours.backward()
    torch.testing.assert_close(ours, released, rtol=1e-12, atol=1e-12)
    for got, want in zip(ours_leaves, leaves):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_negprompt_loss_bad_inputs(backend):
    image, pos, neg, labels = make_inputs((4, 3, 2, 8), torch.float32, "cpu")
    cases = [
        (lambda: ops.negprompt_loss(image, pos, neg, backend=backend, nis="ce", labels=labels),
         r"nis must be one of \('msp', 'oe', 'eq4'\), got 'ce'"),
        (lambda: ops.negprompt_loss(image, pos, neg, backend=backend, labels=labels, npd="away"),
         r"npd must be one of \('auto', 'push', 'pull'\)"),
        (lambda: ops.negprompt_loss(image, pos, neg, backend=backend, labels=labels, nnd="abs_sum"),
         r"nnd must be one of \('auto', 'mean', 'pairwise'\)"),
        (lambda: ops.negprompt_loss(image, pos, neg, backend=backend), "nis='msp' needs labels"),
        (lambda: ops.negprompt_loss(image, pos, neg, backend=backend, labels=torch.tensor([0, 1, 3, 0])),
         r"labels must lie in \[0, 3\)"),
        (lambda: ops.negprompt_loss(image, pos, neg, backend=backend, labels=labels[:3]), "3 entries for 4"),
        (lambda: ops.negprompt_loss(image, pos, neg, backend=backend, labels=labels.int()), "int64"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    # labels are read by "msp" only: the other objectives ignore them
    for nis in ("oe", "eq4"):
        assert ops.negprompt_loss(image, pos, neg, backend=backend, nis=nis, labels=torch.tensor([9, 9, 9, 9])) == \
            ops.negprompt_loss(image, pos, neg, backend=backend, nis=nis)


@pytest.mark.parametrize("backend,device,dtype,shape", backend_params())
def test_soft_cross_entropy(backend, device, dtype, shape):
    image, pos, neg, labels = make_inputs(shape, dtype, device)
    text = torch.cat([pos, neg.reshape(-1, shape[-1])])
    # Mixed soft targets: lam on the true label, 1 - lam on a random other label (LAPT's mixup labels).
    g = torch.Generator().manual_seed(2)
    lam = torch.rand(shape[0], 1, generator=g, dtype=torch.float64)
    partner = torch.randint(0, text.shape[0], (shape[0],), generator=g)
    targets = lam * F.one_hot(labels.cpu(), text.shape[0]) + (1 - lam) * F.one_hot(partner, text.shape[0])
    targets = targets.to(dtype=dtype, device=device)
    fn = lambda b, i, t: ops.soft_cross_entropy(i, t, targets.to(i.dtype), scale=100.0, backend=b)  # noqa: E731
    check_forward_backward(fn, backend, [image, text], "soft_cross_entropy")


def test_lsn_negative_loss_hand_computed():
    # C = 2, cos to the negatives (1, 0), label 1 at T = 1: -log softmax((1 - cos)/1)[1] = -log(e^1 / (e^0 + e^1)).
    image = torch.tensor([[1.0, 0.0]])
    neg = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    expected = -math.log(math.e / (1 + math.e))
    for backend in ("torch", "cpp"):
        value = ops.lsn_negative_loss(image, neg, torch.tensor([1]), temperature=1.0, backend=backend)
        assert value.item() == pytest.approx(expected, rel=1e-6)


def test_negprompt_loss_hand_computed():
    # C = 1, K = 2 negatives at cos (1, 0) to the image; T = 1.
    # L_NIS = logsumexp(1, 0) - mean(1, 0); L_NPD = -mean(cos(neg_k, pos)) = -(1 + 0)/2; L_NND = cos(n0, n1) = 0.
    image = torch.tensor([[1.0, 0.0]])
    pos = torch.tensor([[1.0, 0.0]])
    neg = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])
    nis = math.log(math.e + 1) - 0.5
    expected = nis + 0.1 * (-0.5) + 0.05 * 0.0
    for backend in ("torch", "cpp"):
        value = ops.negprompt_loss(image, pos, neg, beta=0.1, gamma=0.05, temperature=1.0, backend=backend,
                                   nis="eq4")
        assert value.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_gradcheck_fp64(backend):
    image, pos, neg, labels = make_inputs((3, 2, 2, 5), torch.float64, "cpu")
    targets = torch.softmax(torch.randn(3, 6, dtype=torch.float64), dim=-1)
    text = torch.cat([pos, neg.reshape(-1, 5)])
    leaf = lambda t: t.clone().requires_grad_(True)  # noqa: E731
    checks = {
        "lsn": (lambda i, n: ops.lsn_negative_loss(i, n, labels, 0.5, backend=backend), (image, neg[:, 0])),
        **{f"negprompt {nis}": (lambda i, p, n, nis=nis: ops.negprompt_loss(i, p, n, 0.1, 0.05, 0.5, backend=backend,
                                                                             nis=nis, labels=labels),
                                (image, pos, neg)) for nis in ("msp", "oe", "eq4")},
        "soft_ce": (lambda i, t: ops.soft_cross_entropy(i, t, targets, 3.0, backend=backend), (image, text)),
        "cosine": (lambda i, t: ops.cosine_logits(i, t, 2.0, backend=backend), (image, text)),
        "ortho_abs": (lambda n: ops.orthogonality_loss(n, "abs_sum", backend=backend), (neg,)),
        "ortho_mean": (lambda n: ops.orthogonality_loss(n, "mean_cos", backend=backend), (neg,)),
    }
    for name, (fn, inputs) in checks.items():
        assert torch.autograd.gradcheck(fn, tuple(leaf(t.contiguous()) for t in inputs)), name


def _mm_calls(fn) -> int:
    """Matrix products (aten::mm) that fn() runs, counted by the autograd profiler."""
    with torch.autograd.profiler.profile() as prof:
        fn()
    return sum(1 for event in prof.function_events if event.name == "aten::mm")


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("op", ["lsn", "negprompt", "soft_ce", "cosine"])
def test_frozen_image_features_skip_their_gradient(op, backend):
    # Prompt learning trains the text side against frozen CLIP image features: the backward must give the text
    # the reference's gradient and skip the [B, N] x [N, D] product of the image gradient.
    image, pos, neg, labels = make_inputs((5, 3, 2, 8), torch.float32, "cpu")
    text = torch.cat([pos, neg.reshape(-1, 8)])
    targets = torch.softmax(torch.randn(5, 9, generator=torch.Generator().manual_seed(3)), dim=-1)
    losses = {
        "lsn": lambda b, i, t: ops.lsn_negative_loss(i, t[:3], labels, 0.5, backend=b),
        "negprompt": lambda b, i, t: ops.negprompt_loss(i, t[:3], t[3:].reshape(3, 2, 8), 0.1, 0.05, 0.5, backend=b,
                                                        labels=labels),
        "soft_ce": lambda b, i, t: ops.soft_cross_entropy(i, t, targets, 3.0, backend=b),
        "cosine": lambda b, i, t: ops.cosine_logits(i, t, 2.0, backend=b).square().sum(),
    }
    fn = losses[op]

    def backward(b, image_grad):
        i, t = image.clone().requires_grad_(image_grad), text.clone().requires_grad_(True)
        loss = fn(b, i, t)
        products = _mm_calls(loss.backward)
        return t.grad, products

    text_grad, frozen_products = backward(backend, False)
    ref_text_grad, _ = backward("torch", False)
    torch.testing.assert_close(text_grad, ref_text_grad, rtol=1e-4, atol=1e-5)
    if backend == "cpp":  # the GPU backends' products are inside their kernels; torch's mm is what cpp runs
        assert frozen_products == backward(backend, True)[1] - 1
