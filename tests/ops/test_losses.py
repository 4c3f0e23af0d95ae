"""Prompt losses: value and gradients on every backend against the reference; gradcheck; hand values."""

import math

import pytest
import torch
import torch.nn.functional as F

from promptkit import ops

from ._grads import check_forward_backward
from .conftest import backend_params, make_inputs


@pytest.mark.parametrize("backend,device,dtype,shape", backend_params())
def test_lsn_negative_loss(backend, device, dtype, shape):
    image, _, neg, labels = make_inputs(shape, dtype, device)
    fn = lambda b, i, n, y: ops.lsn_negative_loss(i, n, y, temperature=0.05, backend=b)  # noqa: E731
    check_forward_backward(fn, backend, [image, neg[:, 0].contiguous(), labels], "lsn_negative_loss")


@pytest.mark.parametrize("backend,device,dtype,shape", backend_params())
def test_negprompt_loss(backend, device, dtype, shape):
    image, pos, neg, _ = make_inputs(shape, dtype, device)
    fn = lambda b, i, p, n: ops.negprompt_loss(i, p, n, beta=0.1, gamma=0.05, temperature=0.01,  # noqa: E731
                                               backend=b)
    check_forward_backward(fn, backend, [image, pos, neg], "negprompt_loss")


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
        value = ops.negprompt_loss(image, pos, neg, beta=0.1, gamma=0.05, temperature=1.0, backend=backend)
        assert value.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_gradcheck_fp64(backend):
    image, pos, neg, labels = make_inputs((3, 2, 2, 5), torch.float64, "cpu")
    targets = torch.softmax(torch.randn(3, 6, dtype=torch.float64), dim=-1)
    text = torch.cat([pos, neg.reshape(-1, 5)])
    leaf = lambda t: t.clone().requires_grad_(True)  # noqa: E731
    checks = {
        "lsn": (lambda i, n: ops.lsn_negative_loss(i, n, labels, 0.5, backend=backend), (image, neg[:, 0])),
        "negprompt": (lambda i, p, n: ops.negprompt_loss(i, p, n, 0.1, 0.05, 0.5, backend=backend),
                      (image, pos, neg)),
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
        "negprompt": lambda b, i, t: ops.negprompt_loss(i, t[:3], t[3:].reshape(3, 2, 8), 0.1, 0.05, 0.5, backend=b),
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
