"""cosine_logits on every backend: value and gradients, [N, D] and [C, K, D] text."""

import pytest
import torch

from promptkit import ops

from ._grads import check_forward_backward
from .conftest import backend_params, make_inputs


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
