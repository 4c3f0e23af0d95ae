"""The l2norm primitives on every backend: rows with tiny norms follow F.normalize's gradient, and a half
precision row keeps its fp32 gradient."""

import pytest
import torch
import torch.nn.functional as F

from promptkit import ops
from promptkit.ops._kernels import EPS, kernels

from .conftest import ALL_BACKENDS, assert_matches_reference

DTYPES = [torch.float32, torch.float64]


def tiny_rows(dtype: torch.dtype, device: str) -> torch.Tensor:
    """[5, 7] rows: a normal one, norm 1e-14 and 0.5 eps (clamped at eps), exactly eps (not clamped: torch's
    clamp_min passes the gradient at equality), and zero."""
    g = torch.Generator().manual_seed(3)
    direction = F.normalize(torch.randn(5, 7, generator=g, dtype=torch.float64), dim=1).to(dtype)
    eps = torch.tensor(EPS, dtype=dtype)  # eps as the dtype holds it: a one-entry row of it has norm exactly eps
    x = torch.stack([direction[0] * 3, direction[1] * 1e-14, direction[2] * 0.5 * eps, torch.zeros(7, dtype=dtype),
                     torch.zeros(7, dtype=dtype)])
    x[3, 2] = eps
    return x.to(device)


def assert_rows_match(out: torch.Tensor, fn, *inputs: torch.Tensor, what: str) -> None:
    """out against fn(*inputs) evaluated by torch in out's input dtype and in fp64, with the suite's rule
    (conftest.assert_matches_reference), row by row: a clamped row's gradient is ~1 / eps."""
    same = fn(*inputs)
    truth = fn(*(t.double() for t in inputs))
    for r in range(out.shape[0]):
        assert_matches_reference(out[r], same[r].to(out.dtype), truth[r], what=f"{what}, row {r}")


def normalize_value(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=1, eps=EPS)


def normalize_grad(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """The gradient of F.normalize(x) for upstream dy, computed by torch autograd in x's dtype."""
    leaf = x.detach().clone().requires_grad_()
    F.normalize(leaf, dim=1, eps=EPS).backward(dy)
    return leaf.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_l2norm_of_tiny_rows_matches_normalize(backend, device, dtype):
    x = tiny_rows(dtype, device)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(dtype).to(device)
    k = kernels(backend)
    y, inv = k.l2norm(x)
    assert_rows_match(y, normalize_value, x, what=f"{backend} l2norm")
    assert_rows_match(k.l2norm_backward(dy, y, inv), normalize_grad, x, dy, what=f"{backend} l2norm_backward")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend,device", [("torch", "cpu")] + ALL_BACKENDS)
def test_cosine_logits_gradient_of_tiny_image_rows(backend, device, dtype):
    """The op level, the torch reference included: d cosine_logits / d image on rows of tiny norm."""
    image = tiny_rows(dtype, device).requires_grad_()
    text = F.normalize(torch.randn(3, 7, generator=torch.Generator().manual_seed(5), dtype=torch.float64), dim=1)
    text = text.to(dtype).to(device)
    upstream = torch.randn(5, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64).to(dtype).to(device)
    (ops.cosine_logits(image, text, scale=10.0, backend=backend) * upstream).sum().backward()

    def image_grad(x, t, g):
        leaf = x.detach().clone().requires_grad_()
        ((10.0 * F.normalize(leaf, dim=1, eps=EPS) @ F.normalize(t, dim=1, eps=EPS).T) * g).sum().backward()
        return leaf.grad

    assert_rows_match(image.grad, image_grad, image.detach(), text, upstream, what=f"{backend} cosine_logits")


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_l2norm_backward_keeps_the_fp32_gradient_of_half_rows(backend, device):
    """The op layer hands l2norm_backward fp32 gradients (ortho's are ~1e-5); rounding them to the rows' fp16
    would put them among fp16's subnormals (below 6.1e-5), a few percent off. A precision contract, not
    approximate math: the fp32 result must match the fp64 formula on the same inputs to fp32 precision."""
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(6, 16, generator=g, dtype=torch.float64) * 0.01).half().to(device)
    dy = (torch.randn(6, 16, generator=g, dtype=torch.float64) * 1e-6).float().to(device)
    k = kernels(backend)
    y, inv = k.l2norm(x)
    dx = k.l2norm_backward(dy, y, inv)
    assert dx.dtype == torch.float32
    y64, inv64, dy64 = y.double().cpu(), inv.double().cpu()[:, None], dy.double().cpu()
    expected = inv64 * (dy64 - y64 * (dy64 * y64).sum(1, keepdim=True))
    torch.testing.assert_close(dx.double().cpu(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
