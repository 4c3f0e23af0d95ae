"""cosine_logits on every backend: value and gradients, [N, D] and [C, K, D] text."""

import pytest
import torch
import torch.nn.functional as F

from promptkit import ops
from promptkit import abi

from ._grads import check_forward_backward
from .conftest import ALL_BACKENDS, backend_params, make_inputs
from .test_primitives import assert_rows_match, tiny_rows


@pytest.mark.parametrize("backend,device,dtype,shape", backend_params())
def test_cosine_logits(backend, device, dtype, shape):
    image, pos, neg, _ = make_inputs(shape, dtype, device)
    fn = lambda b, i, t: ops.cosine_logits(i, t, scale=100.0, backend=b)  # noqa: E731
    check_forward_backward(fn, backend, [image, pos], "cosine_logits [N, D]")
    check_forward_backward(fn, backend, [image, neg], "cosine_logits [C, K, D]")


def test_cosine_logits_shape_and_values():
    image = torch.tensor([[3.0, 4.0]])
    text = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # C = 1, K = 2
    out = ops.cosine_logits(image, text, scale=10.0, backend="cpp")
    assert out.shape == (1, 1, 2)
    torch.testing.assert_close(out, torch.tensor([[[6.0, 8.0]]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend,device", [("torch", "cpu")] + ALL_BACKENDS)
def test_cosine_logits_gradient_of_tiny_image_rows(backend, device, dtype):
    """d cosine_logits / d image on rows of tiny norm (the l2norm primitive's clamp), the torch reference included."""
    image = tiny_rows(dtype, device).requires_grad_()
    text = F.normalize(torch.randn(3, 7, generator=torch.Generator().manual_seed(5), dtype=torch.float64), dim=1)
    text = text.to(dtype).to(device)
    upstream = torch.randn(5, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64).to(dtype).to(device)
    (ops.cosine_logits(image, text, scale=10.0, backend=backend) * upstream).sum().backward()

    def image_grad(x, t, g):
        leaf = x.detach().clone().requires_grad_()
        normalize = lambda v: F.normalize(v, dim=1, eps=abi.L2NORM_EPS)  # noqa: E731
        ((10.0 * normalize(leaf) @ normalize(t).T) * g).sum().backward()
        return leaf.grad

    assert_rows_match(image.grad, image_grad, image.detach(), text, upstream, what=f"{backend} cosine_logits")
